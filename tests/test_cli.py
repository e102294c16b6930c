"""The core commands end to end on a tiny model directory, and their refusals of bad input."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from archs import tiny_model

import headshare
from headshare.cli import main

# the paper's method, named: share and plan default to autoshare, slower than these tests need
PAPER = ("--method", "directshare")


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    d = tmp_path / "model"
    tiny_model("llama-gqa").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("headshare: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_analyze_plan_share_info(model_dir, tmp_path, capsys):
    assert main(["analyze", str(model_dir), "--out", str(tmp_path / "sims.json")]) == 0
    sims = json.loads((tmp_path / "sims.json").read_text())
    assert sims["metric"] == "qk" and len(sims["best_matches"]) == 4
    assert main(["plan", str(model_dir), *PAPER, "--ratio", "0.5", "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["assignments"]) == 3
    out = tmp_path / "shared"
    assert main(["share", str(model_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(out)]) == 0
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


def test_share_with_ratio_matches_python_api(model_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["share", str(model_dir), *PAPER, "--ratio", "0.5", "--out", str(out)]) == 0
    model = tiny_model("llama-gqa")
    headshare.share(model, headshare.make_plan(model, 0.5))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(headshare.load(out)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("ratio", ["1", "-0.1", "abc", "1.5"])
def test_bad_ratio(model_dir, tmp_path, ratio, capsys):
    with pytest.raises(SystemExit) as e:
        main(["share", str(model_dir), *PAPER, "--ratio", ratio, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "ratio" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["share", str(tmp_path / "nope"), *PAPER, "--ratio", "0.3", "--out", str(tmp_path / "o")]) == 2
    _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_corrupt_model(model_dir, tmp_path, capsys):
    (model_dir / "config.json").write_text("{ broken")
    assert main(["share", str(model_dir), *PAPER, "--ratio", "0.3", "--out", str(tmp_path / "o")]) == 2
    assert "config.json" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["share", str(model_dir), *PAPER, "--ratio", "0.3", "--out", str(out)]) == 2
    assert "--force" in _error_line(capsys)
    assert (out / "mine.txt").read_text() == "keep"
    assert main(["share", str(model_dir), *PAPER, "--ratio", "0.3", "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()


def test_output_inside_model_is_always_refused(model_dir, capsys):
    before = sorted(p.name for p in model_dir.iterdir())
    assert main(["share", str(model_dir), *PAPER, "--ratio", "0.3", "--out", str(model_dir / "sub"), "--force"]) == 2
    assert "inside the input model" in _error_line(capsys)
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_failure_while_saving_leaves_nothing(model_dir, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedTokenizerFast

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(OSError):
        main(["share", str(model_dir), *PAPER, "--ratio", "0.3", "--out", str(tmp_path / "o")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_plan_that_does_not_fit(model_dir, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_model("llama-mha").save_pretrained(other)
    assert main(["plan", str(other), *PAPER, "--ratio", "0.3", "--out", str(tmp_path / "p.json")]) == 0
    assert main(["share", str(model_dir), "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not fit" in _error_line(capsys)


def test_info_on_a_plain_model(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 2
    assert "not a headshare checkpoint" in _error_line(capsys)


def test_method_options_from_the_command_line(model_dir, tmp_path, capsys):
    argv = ["plan", str(model_dir), "--ratio", "0.5", "--method", "random"]
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
