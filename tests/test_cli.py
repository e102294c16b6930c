"""`headshare.cli`: the commands end to end on tiny model directories, and their refusals of bad input."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch
from conftest import TINY_CORPUS, corpus_ids, outputs, refused, write_task

import headshare
from headshare.cli import main
from headshare.evaluate import perplexity
from headshare.fetch import load_model
from headshare.methods.auto import UNIT_WORDS

# the paper's method, named: share and plan default to autoshare, slower than these tests need
PAPER = ("--method", "directshare")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("headshare: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_analyze_plan_share_info(tiny_dir, tmp_path, capsys):
    assert main(["analyze", str(tiny_dir), "--out", str(tmp_path / "sims.json")]) == 0
    sims = json.loads((tmp_path / "sims.json").read_text())
    assert sims["metric"] == "qk" and len(sims["best_matches"]) == 4
    assert main(["plan", str(tiny_dir), *PAPER, "--ratio", "0.5", "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["assignments"]) == 3
    out = tmp_path / "shared"
    assert main(["share", str(tiny_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("params_original", "params_shared", "units_total", "units_shared", "bytes_original",
                "bytes_shared"):
        assert key in info
    assert info["units_total"] == 6 and info["units_shared"] == 3
    assert info["params_original"] - info["params_shared"] == 3 * 32 * 48
    # the saved plan is the one given, and the tokenizer travels with the weights
    saved = json.loads((out / "config.json").read_text())["headshare"]
    assert saved["assignments"] == plan["assignments"]
    assert (out / "tokenizer.json").is_file()
    model = headshare.load(out)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 99)


def test_share_with_ratio_matches_python_api(tiny_dir, tmp_path, tiny_model):
    out = tmp_path / "o"
    assert main(["share", str(tiny_dir), *PAPER, "--ratio", "0.5", "--out", str(out)]) == 0
    model = tiny_model("llama-gqa")
    headshare.share(model, headshare.make_plan(model, 0.5))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(headshare.load(out)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("ratio", ["1", "-0.1", "abc", "1.5"])
def test_bad_ratio(tiny_dir, tmp_path, ratio, capsys):
    with pytest.raises(SystemExit) as e:
        main(["share", str(tiny_dir), *PAPER, "--ratio", ratio, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "ratio" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["share", str(tmp_path / "nope"), *PAPER, "--ratio", "0.3", "--out", str(tmp_path / "o")]) == 2
    _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_corrupt_model(tiny_dir, tmp_path, capsys):
    (tiny_dir / "config.json").write_text("{ broken")
    assert main(["share", str(tiny_dir), *PAPER, "--ratio", "0.3", "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["share", str(tiny_dir), *PAPER, "--ratio", "0.3", "--out", str(out)]) == 2
    assert "--force" in _error_line(capsys)
    assert (out / "mine.txt").read_text() == "keep"
    assert main(["share", str(tiny_dir), *PAPER, "--ratio", "0.3", "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()


def test_output_inside_model_is_always_refused(tiny_dir, capsys):
    before = sorted(p.name for p in tiny_dir.iterdir())
    assert main(["share", str(tiny_dir), *PAPER, "--ratio", "0.3", "--out", str(tiny_dir / "sub"), "--force"]) == 2
    assert "inside the input model" in _error_line(capsys)
    assert sorted(p.name for p in tiny_dir.iterdir()) == before


def test_failure_while_saving_leaves_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedTokenizerFast

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(OSError):
        main(["share", str(tiny_dir), *PAPER, "--ratio", "0.3", "--out", str(tmp_path / "o")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_plan_that_does_not_fit(tiny_dir, tmp_path, capsys, tiny_model):
    other = tmp_path / "other"
    tiny_model("llama-mha").save_pretrained(other)
    assert main(["plan", str(other), *PAPER, "--ratio", "0.3", "--out", str(tmp_path / "p.json")]) == 0
    assert main(["share", str(tiny_dir), "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not fit" in _error_line(capsys)


def test_info_on_a_plain_model(tiny_dir, capsys):
    assert main(["info", str(tiny_dir)]) == 2
    assert "not a headshare checkpoint" in _error_line(capsys)


def test_method_options_from_the_command_line(tiny_dir, tmp_path, capsys, tiny_model):
    argv = ["plan", str(tiny_dir), "--ratio", "0.5", "--method", "random"]
    assert main([*argv, "-o", "seed=3", "--out", str(tmp_path / "a.json")]) == 0
    assert main([*argv, "--option", "seed=3", "--out", str(tmp_path / "b.json")]) == 0
    assert main([*argv, "--seed", "3", "--out", str(tmp_path / "c.json")]) == 0
    plans = [json.loads((tmp_path / f"{k}.json").read_text()) for k in "abc"]
    assert plans[0]["config"] == {"ratio": 0.5, "seed": 3, "version": 1}
    assert plans[0]["assignments"] == plans[1]["assignments"] == plans[2]["assignments"]
    want = headshare.make_plan(tiny_model("llama-gqa"), 0.5, "random", seed=3)
    assert plans[0]["assignments"] == want.to_dict()["assignments"]
    capsys.readouterr()
    # an option the method lacks, and a value of the wrong type: one line each, nothing written
    assert main([*argv, "-o", "metric=qk", "--out", str(tmp_path / "d.json")]) == 2
    assert "RandomConfig has no option 'metric'" in _error_line(capsys)
    assert main([*argv, "-o", "seed=many", "--out", str(tmp_path / "d.json")]) == 2
    assert "seed" in _error_line(capsys)
    assert not (tmp_path / "d.json").exists()


def test_share_and_plan_default_to_autoshare_and_say_so(capsys):
    from headshare.cli import build_parser

    parser = build_parser()
    for command in ("share", "plan"):
        assert parser.parse_args([command, "m", "--out", "o"]).method == "autoshare"
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "default: autoshare, the best method headshare has; the paper's: --method directshare" in text
    # PostShare trains the paper's pairs, and the report shows the paper's analysis
    assert parser.parse_args(["posttrain", "m", "--out", "o"]).method == "directshare"
    assert parser.parse_args(["report", "m", "--out", "o"]).method == "directshare"


def test_defaults_come_from_the_configs(capsys):
    from headshare.cli import build_parser
    from headshare.evaluate import perplexity
    from headshare.posttrain import PostTrainConfig

    parser = build_parser()
    args = parser.parse_args(["posttrain", "m", "--out", "o"])
    assert all(getattr(args, k) is None for k in ("lam", "lr", "steps", "mode"))  # the config's defaults apply
    with pytest.raises(SystemExit):
        parser.parse_args(["posttrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = PostTrainConfig.defaults()
    assert f"weight of the constraint (default {d['lam']})" in text
    assert f"optimizer steps (default {d['steps']})" in text
    assert parser.parse_args(["eval", "m"]).window == inspect.signature(perplexity).parameters["window"].default


# -- methods: plans with fitted weights, options, unit kinds, what share and info print --------------------

def test_cli_plan_then_share_equals_share_in_one_go(tmp_path, tiny_tokenizer, capsys, tiny_model, tiny_dir):
    from safetensors.torch import load_file

    d = tiny_dir
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(TINY_CORPUS * 8))
    common = ["--method", "fitshare", "--ratio", "0.5", "--calib", str(calib), "--calib-tokens", "128",
              "-o", "min_gain=0"]
    assert main(["share", str(d), *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["plan", str(d), *common, "--out", str(tmp_path / "p.json")]) == 0
    assert "fitted weights in" in capsys.readouterr().err
    assert (tmp_path / "p.safetensors").is_file()
    assert main(["share", str(d), "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "two")]) == 0
    one, two = (load_file(tmp_path / k / "model.safetensors") for k in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    ids = corpus_ids(tiny_tokenizer)
    assert torch.equal(outputs(headshare.load(tmp_path / "one"), ids), outputs(headshare.load(tmp_path / "two"), ids))
    info = headshare.info(tmp_path / "two")
    assert info["method"] == "fitshare" and info["units_refitted"] > 0
    # the same plan on other weights: one line, exit 2, nothing written
    other = tmp_path / "other"
    tiny_model("llama-gqa", seed=5).save_pretrained(other)
    capsys.readouterr()
    assert main(["share", str(other), "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "three")]) == 2
    assert "fitted on other attention weights" in _error_line(capsys)
    assert not (tmp_path / "three").exists()


def test_cli_refuses_flags_the_method_does_not_have(tmp_path, capsys, tiny_dir):
    d = tiny_dir
    for argv, name in [(["--method", "fitshare", "--metric", "qk"], "--metric"),
                       (["--method", "directshare", "--seed", "1"], "--seed"),
                       (["--method", "fitshare", "-o", "seed=1"], "'seed'")]:
        assert main(["share", str(d), "--ratio", "0.3", *argv, "--out", str(tmp_path / "o")]) == 2
        assert name in _error_line(capsys)
        assert not (tmp_path / "o").exists()


def test_cli_plan_and_share_with_query_units(tmp_path, capsys, tiny_model):
    model = tiny_model("llama-gqa")
    src = tmp_path / "src"
    model.save_pretrained(src)
    assert main(["plan", str(src), "--ratio", "0.5", "--method", "random", "--unit", "query",
                 "--out", str(tmp_path / "p.json")]) == 0
    assert "of 12" in capsys.readouterr().err
    assert main(["share", str(src), "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "6 / 12 (one query head" in out
    assert main(["info", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unit_kind"] == "query"
    assert main(["plan", str(src), "--ratio", "0.5", "--unit", "heads", "--out", str(tmp_path / "q.json")]) == 2


def test_cli_share_and_info_count_based_units(tmp_path, calib_file, capsys, tiny_llama, tiny_checkpoint):
    tiny_checkpoint(tmp_path / "m", tiny_llama())
    main(["share", str(tmp_path / "m"), "--method", "basisshare", "--ratio", "0.5", "-o", f"calib={calib_file}",
          "-o", "calib_tokens=128", "-o", "group=2", "--out", str(tmp_path / "o")])
    printed = capsys.readouterr().out
    main(["info", str(tmp_path / "o"), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert s["method"] == "basisshare" and s["bases"] >= 1
    assert len(s["basis_ranks"]) == s["bases"] and min(s["basis_ranks"]) >= 1 and s["based_rows"] == "q/k/v"
    assert f"shared bases, ranks {', '.join(map(str, s['basis_ranks']))})" in printed
    assert s["units_based"] + s["units_pruned"] == s["units_total"]  # one group of 2 layers: every unit based or pruned


def test_cli_share_and_info_name_the_candidate_kept(tmp_path, calib_file, capsys, tiny_llama,
                                                    tiny_checkpoint):
    tiny_checkpoint(tmp_path / "m", tiny_llama())
    main(["share", str(tmp_path / "m"), "--method", "autoshare", "--ratio", "0.34", "-o", f"calib={calib_file}",
          "-o", "calib_tokens=96", "-o", "val_tokens=64", "-o", "candidates=prune@kv,fitprune@query,random@kv",
          "--out", str(tmp_path / "o")])
    printed = capsys.readouterr().out
    main(["info", str(tmp_path / "o"), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert s["method"] == "autoshare" and s["chosen"] in ("prune@kv", "fitprune@query", "random@kv")
    assert f"autoshare (kept {s['chosen']})" in printed
    assert s["unit_kind"] == s["chosen"].split("@")[1]
    # why: every candidate's held-out loss, in the checkpoint's info and on the screen
    assert [c["candidate"] for c in s["candidates"]] == ["prune@kv", "fitprune@query", "random@kv"]
    assert min(s["candidates"], key=lambda c: c["val_loss"])["candidate"] == s["chosen"]
    for c in s["candidates"]:
        assert f"  {c['candidate']}" in printed and f"loss {c['val_loss']:.4f}" in printed
    # and in one sentence: the unit kind kept and the margin over the other kind
    assert s["why"].startswith(f"{UNIT_WORDS[s['unit_kind']]}: {s['chosen']} has the least held-out loss")
    assert "below the best on" in s["why"]
    assert any(line.startswith("  why ") and line.endswith(s["why"]) for line in printed.splitlines())


# -- eval: perplexity, KL against a reference, lm-eval tasks, on plain and shared checkpoints -------------

@pytest.fixture(scope="session")
def write_models(tiny_llama, tiny_tokenizer, tiny_checkpoint):
    """Factory: write_models(d, seed=0) writes an original tiny Llama (3 layers) to d/orig and its
    DirectShare-shared copy to d/shared, both with the tokenizer."""

    def write(d, seed: int = 0) -> None:
        tiny_checkpoint(d / "orig", tiny_llama(seed=seed, num_hidden_layers=3))
        shared = tiny_llama(seed=seed, num_hidden_layers=3)
        headshare.share(shared, headshare.make_plan(shared, 0.5))
        shared.save_pretrained(d / "shared", tokenizer=tiny_tokenizer)

    return write


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory, write_models):
    """For eval: an original tiny Llama, its DirectShare-shared copy (both with the tokenizer), a text."""
    d = tmp_path_factory.mktemp("eval")
    write_models(d)
    (d / "text.txt").write_text("\n".join(TINY_CORPUS * 5))
    return d


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_perplexity_json_matches_the_python_api(eval_dirs, capsys, tiny_llama, tiny_tokenizer):
    got = _eval(capsys, eval_dirs / "orig", "--text", eval_dirs / "text.txt", "--window", 16, "--stride", 8,
                "--max-tokens", 100)
    assert {"perplexity", "tokens", "nll"} <= set(got) and "kl" not in got
    want = perplexity(tiny_llama(num_hidden_layers=3), tiny_tokenizer, (eval_dirs / "text.txt").read_text(),
                      window=16, stride=8, max_tokens=100, progress=False)
    assert got["tokens"] == want["tokens"] == 99
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert (got["window"], got["stride"]) == (16, 8)


def test_shared_checkpoint_against_reference(eval_dirs, capsys):
    text = eval_dirs / "text.txt"
    same = _eval(capsys, eval_dirs / "orig", "--text", text, "--window", 32,
                 "--reference", eval_dirs / "orig")
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    got = _eval(capsys, eval_dirs / "shared", "--text", text, "--window", 32,
                "--reference", eval_dirs / "orig")
    assert {"perplexity", "tokens", "kl", "top1_agreement"} <= set(got)
    assert got["kl"] > 1e-6 and 0.0 <= got["top1_agreement"] < 1.0
    assert got["reference_perplexity"] == pytest.approx(same["perplexity"], rel=1e-9)
    assert got["perplexity"] != pytest.approx(same["perplexity"], rel=1e-6)


def test_lm_eval_tasks_with_recovery(eval_dirs, tmp_path, capsys, write_models):
    # seed 1: the original model answers the first two questions right (seed 0 gets both wrong, and a
    # recovery against a reference accuracy of 0 is no ratio at all)
    write_models(tmp_path, seed=1)
    got = _eval(capsys, tmp_path / "shared", "--text", eval_dirs / "text.txt", "--window", 32, "--reference",
                tmp_path / "orig", "--tasks", "tiny_mc", "--include-path", write_task(tmp_path), "--no-default-tasks",
                "--limit", 2)
    mine, ref = got["tasks"]["tiny_mc"], got["reference_tasks"]["tiny_mc"]
    assert mine["acc"] in (0.0, 0.5, 1.0) and ref["acc"] in (0.5, 1.0)  # --limit 2: two questions scored
    assert ref["acc"] > 0, "the setup must give the reference a nonzero accuracy"
    recovery = got["recovery"]["tiny_mc"]
    assert set(recovery) == {k for k in mine if not k.endswith("stderr")} >= {"acc", "acc_norm"}
    assert recovery["acc"] == pytest.approx(mine["acc"] / ref["acc"])
    for k, r in recovery.items():  # every metric has one; None only where the reference scored 0
        assert r == (pytest.approx(mine[k] / ref[k]) if ref[k] else None), k


def test_human_output_and_errors(eval_dirs, tmp_path, capsys, tiny_llama):
    assert main(["eval", str(eval_dirs / "orig"), "--text", str(eval_dirs / "text.txt"),
                 "--window", "32"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    assert main(["eval", str(tmp_path / "missing"), "--json"]) == 2
    assert "missing" in capsys.readouterr().err
    tiny_llama().save_pretrained(tmp_path / "no-tok")
    assert main(["eval", str(tmp_path / "no-tok"), "--json"]) == 2
    assert "tokenizer" in capsys.readouterr().err


# -- bad input, tried as a new user would: one line on stderr, exit status 2, nothing written ---------------

def damage(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00" * 64)


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_safetensors_are_refused_in_one_line(shared_dirs, capsys, how):
    for name in ("orig", "shared"):
        shutil.copytree(shared_dirs / name, shared_dirs / f"bad-{name}")
        damage(shared_dirs / f"bad-{name}" / "model.safetensors", how)
    out = shared_dirs / "out"
    refused(capsys, ["share", shared_dirs / "bad-orig", *PAPER, "--ratio", "0.5", "--out", out], "bad-orig")
    refused(capsys, ["analyze", shared_dirs / "bad-orig"], "model.safetensors", "not a readable safetensors")
    refused(capsys, ["info", shared_dirs / "bad-shared"], "model.safetensors", "not a readable safetensors")
    refused(capsys, ["eval", shared_dirs / "bad-shared"], "model.safetensors")
    assert not out.exists()


def test_an_already_shared_model_is_refused(shared_dirs, capsys):
    out = shared_dirs / "out"
    refused(capsys, ["share", shared_dirs / "shared", *PAPER, "--ratio", "0.3", "--out", out],
            "already shared")
    refused(capsys, ["analyze", shared_dirs / "shared"], "already shared")
    refused(capsys, ["plan", shared_dirs / "shared", *PAPER, "--ratio", "0.3", "--out",
                     shared_dirs / "p.json"], "already shared")
    assert not out.exists() and not (shared_dirs / "p.json").exists()
    model = headshare.load(shared_dirs / "shared")
    with pytest.raises(ValueError, match="already shared"):
        headshare.make_plan(model, 0.3)
    original = load_model(str(shared_dirs / "orig"))[0]
    with pytest.raises(ValueError, match="already shared"):
        headshare.share(model, headshare.make_plan(original, 0.3))


def test_a_text_path_that_does_not_exist_is_refused_before_loading(shared_dirs, capsys):
    refused(capsys, ["eval", shared_dirs / "orig", "--text", shared_dirs / "nope.txt"], "no such text file",
            "nope.txt")
    refused(capsys, ["share", shared_dirs / "orig", *PAPER, "--ratio", "0.3", "--eval", "--text",
                     "./no/such/dir", "--out", shared_dirs / "out"], "no such text file")
    refused(capsys, ["posttrain", shared_dirs / "orig", "--ratio", "0.3", "--data",
                     shared_dirs / "missing.txt", "--out", shared_dirs / "out"], "no such text file")
    assert not (shared_dirs / "out").exists()


def test_bad_method_options_are_refused_before_loading(shared_dirs, capsys):
    plan = shared_dirs / "p.json"
    refused(capsys, ["plan", shared_dirs / "orig", "--ratio", "0.3", "--method", "fitshare", "--metric", "qk",
                     "--out", plan], "--metric", "fitshare")
    refused(capsys, ["plan", shared_dirs / "orig", "--ratio", "0.3", "--method", "fitshare", "-o", "window=x",
                     "--out", plan], "window", "an integer or none")
    refused(capsys, ["plan", shared_dirs / "orig", *PAPER, "--ratio", "0.3", "-o", "bogus=1", "--out", plan],
            "bogus", "metric")
    refused(capsys, ["plan", shared_dirs / "orig", "--ratio", "0.3", "--method", "fitshare", "-o",
                     "select=best", "--out", plan], "select", "heldout")
    refused(capsys, ["bench", "--model", shared_dirs / "orig", "--methods", "random", "-o", "rho=1", "--json",
                     shared_dirs / "b.json"], "rho")
    assert not plan.exists() and not (shared_dirs / "b.json").exists()
    with pytest.raises(ValueError, match="no option 'windw'"):
        headshare.make_plan(load_model(str(shared_dirs / "orig"))[0], 0.3, "fitshare", windw=3)
