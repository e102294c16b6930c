"""`headshare.bench`: rows with every key, ratio 0 measured once, resume without recomputing, table, plot."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CORPUS

import headshare
import headshare.bench as bench
import headshare.bench.run as bench_run
from headshare.arch import layout_of
from headshare.cli import main
from headshare.errors import HeadshareError
from headshare.evaluate import compare

REQUIRED = {"method", "ratio", "perplexity", "kl", "top1_agreement", "attn_params_removed", "params_removed",
            "weight_bytes", "checkpoint_bytes", "peak_rss_bytes", "prefill_s", "decode_s"}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory, tiny_llama, tiny_checkpoint):
    """A tiny Llama (4 layers x 2 units) saved with its tokenizer, and a text file."""
    d = tmp_path_factory.mktemp("bench")
    tiny_checkpoint(d / "model", tiny_llama(num_hidden_layers=4))
    (d / "text.txt").write_text("\n".join(TINY_CORPUS * 12))
    return d


def _run(bench_dir, out, methods, **kw):
    text = str(bench_dir / "text.txt")
    kw.setdefault("run_probe", False)
    return bench.run_bench(str(bench_dir / "model"), [0, 0.5], methods, out, text=text, calib=text,
                           calib_tokens=256, progress=False, **kw)


@pytest.fixture
def count_measure(monkeypatch):
    calls = []
    real = bench.measure

    def counting(method, ratio, *a, **kw):
        calls.append((method, ratio))
        return real(method, ratio, *a, **kw)

    monkeypatch.setattr(bench_run, "measure", counting)
    return calls


def test_rows_table_and_plot(bench_dir, tmp_path, count_measure, tiny_llama):
    out, md, png = tmp_path / "out.json", tmp_path / "t.md", tmp_path / "p.png"
    rows = _run(bench_dir, out, ["directshare", "prune"], md=md, plot=png, run_probe=True)
    assert count_measure == [("directshare", 0.0), ("directshare", 0.5), ("prune", 0.5)]  # ratio 0 once
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(rows))
    assert [(r["method"], r["ratio"]) for r in saved] == [("directshare", 0), ("directshare", 0.5),
                                                          ("prune", 0), ("prune", 0.5)]
    for r in saved:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        # python + torch alone hold more than 50 MB; the tiny model allows 256 positions: 256 - 32 decoded - 1
        assert r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 50e6 and r["peak_excludes_load"]
        assert 0 < r["prefill_s"] < 30 and 0 < r["decode_s"] < 30
        assert r["prefill_tokens"] == 223 and r["decode_tokens"] == 32
    base, shared, pruned = saved[0], saved[1], saved[3]
    # each row records the method config it ran and the run's options
    assert base["config"] is None and all(r["options"] is None for r in saved)
    assert shared["config"] == {"ratio": 0.5, "metric": "qk", "version": 1}
    assert pruned["config"] == {"ratio": 0.5, "calib": str(bench_dir / "text.txt"), "calib_tokens": 256,
                                "relative": True, "version": 1}
    assert {k: v for k, v in saved[2].items() if k != "method"} == {k: v for k, v in base.items() if k != "method"}
    assert base["kl"] == pytest.approx(0, abs=1e-12) and base["top1_agreement"] == 1.0
    assert base["params_removed"] == 0 and base["perplexity"] == pytest.approx(base["reference_perplexity"])

    layout = layout_of(tiny_llama(num_hidden_layers=4).config)
    per_unit = layout.unit_params()
    for r in (shared, pruned):
        assert r["units_removed"] == 4
        assert r["params_removed"] == r["attn_params_removed"] == 4 * per_unit
        assert r["attn_params_removed"] / r["attn_params_total"] == pytest.approx(0.5)
        assert r["weight_bytes"] == base["weight_bytes"] - 4 * 4 * per_unit
        # the checkpoint shrinks by the removed float32 weights, give or take a few header bytes
        assert abs((base["checkpoint_bytes"] - r["checkpoint_bytes"]) - 4 * 4 * per_unit) < 4096
        assert r["kl"] > 0 and r["tokens"] == base["tokens"]

    table = md.read_text().splitlines()
    assert len(table) == 2 + 4 and table[0].startswith("| method | ratio")
    assert "| prune | 0.5 | 4/8 |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_computes_only_missing_rows(bench_dir, tmp_path, count_measure):
    out = tmp_path / "out.json"
    first = _run(bench_dir, out, ["random", "prune"])
    assert len(count_measure) == 3
    with pytest.raises(FileExistsError, match="--resume"):
        _run(bench_dir, out, ["random", "prune"])

    count_measure.clear()
    assert _run(bench_dir, out, ["random", "prune"], resume=True) == first
    assert count_measure == []

    # drop one finished row (as if the run had crashed before it) and add a method
    out.write_text(json.dumps([r for r in first if (r["method"], r["ratio"]) != ("prune", 0.5)]))
    rows = _run(bench_dir, out, ["random", "prune", "layerwise"], resume=True)
    assert count_measure == [("prune", 0.5), ("layerwise", 0.5)]  # layerwise at 0 reuses the measured ratio 0
    assert len(rows) == 6 and rows[:3] == first[:3]
    stable = ("perplexity", "kl", "top1_agreement", "params_removed", "weight_bytes")  # not the timings
    assert {k: rows[3][k] for k in stable} == {k: first[3][k] for k in stable}

    with pytest.raises(ValueError, match="seed"):
        _run(bench_dir, out, ["random"], resume=True, seed=1)
    assert len(_run(bench_dir, out, ["random"], force=True, seed=1)) == 2


def test_a_crash_keeps_finished_rows(bench_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    real = bench.measure

    def crash_on_prune(method, ratio, *a, **kw):
        if method == "prune":
            raise RuntimeError("boom")
        return real(method, ratio, *a, **kw)

    monkeypatch.setattr(bench_run, "measure", crash_on_prune)
    with pytest.raises(RuntimeError, match="boom"):
        _run(bench_dir, out, ["random", "prune"])
    assert [(r["method"], r["ratio"]) for r in json.loads(out.read_text())] == [("random", 0), ("random", 0.5),
                                                                                ("prune", 0)]


def test_measure_takes_a_control_plan_that_is_no_method(tiny_tokenizer, tiny_llama):
    """`make` builds the row's plan (here: prune exactly the units directshare would share) under a free name."""
    from headshare.plan import new_plan

    original = tiny_llama(num_hidden_layers=3)
    text = "\n".join(TINY_CORPUS * 6)
    settings = dict(model="tiny", text="t", calib=None, calib_tokens=None, max_tokens=None, window=32, seed=0,
                    options=None)

    def as_prune(model):
        shared = headshare.make_plan(model, 0.5)
        return new_plan(model, "control", 0.5, pruned=[(a.layer, a.unit) for a in shared.assignments])

    row = bench.measure("directshare-as-prune", 0.5, original, original, tiny_tokenizer, text, settings,
                        run_probe=False, progress=False, make=as_prune)
    plain = bench.measure("prune", 0.5, original, original, tiny_tokenizer, text, settings, run_probe=False,
                          progress=False)
    assert row["method"] == "directshare-as-prune" and row["units_shared"] == 0
    assert row["units_pruned"] == row["units_removed"] == plain["units_removed"] == 3
    assert row["params_removed"] == plain["params_removed"] > 0
    assert row["kl"] > 0 and 0 <= row["loadavg_1min"]


def test_cached_reference_gives_the_same_comparison(tiny_tokenizer, tiny_llama):
    original = tiny_llama(num_hidden_layers=3)
    shared = tiny_llama(num_hidden_layers=3)
    headshare.share(shared, headshare.make_plan(shared, 0.5))
    text = "\n".join(TINY_CORPUS * 6)
    cached = bench.CachedReference(original)
    want = compare(shared, original, tiny_tokenizer, text, window=32, stride=32, progress=False)
    first = compare(shared, cached, tiny_tokenizer, text, window=32, stride=32, progress=False)
    calls = cached.full_calls
    again = compare(shared, cached, tiny_tokenizer, text, window=32, stride=32, progress=False)
    assert calls == want["windows"] and cached.full_calls == calls  # the second pass replays every window
    for key in ("kl", "top1_agreement", "perplexity", "reference_perplexity"):
        assert first[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15)
        assert again[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15)


def test_methods_all_follows_the_registry(monkeypatch):
    from headshare.methods import METHODS, Method, MethodConfig

    monkeypatch.setitem(METHODS, "newer", Method("newer", MethodConfig, lambda *a: None, "a later method", False))
    got = bench.resolve_methods("all")
    assert got == list(METHODS) and got[0] == "directshare" and got[-1] == "newer"
    assert {"random", "layerwise", "prune"} <= set(got)
    assert bench.resolve_methods("prune,all")[0] == "prune" and len(bench.resolve_methods("prune,all")) == len(METHODS)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        bench.resolve_methods(["nope"])


def test_options_go_to_the_methods_that_have_them(bench_dir, tmp_path):
    assert bench.parse_options(None, ["random"]) is None
    assert bench.parse_options(["random.seed=3", "calib-tokens=64"], ["random", "prune"]) == \
        {"random.seed": 3, "calib_tokens": 64}
    with pytest.raises(ValueError, match="'rho' belongs to none of the methods random, prune"):
        bench.parse_options(["rho=1"], ["random", "prune"])
    with pytest.raises(ValueError, match="for method 'fitshare', which this run does not include"):
        bench.parse_options(["fitshare.rho=1"], ["random"])
    settings = {"calib": "c.txt", "calib_tokens": None, "seed": 0, "options": {"calib_tokens": 64, "random.seed": 3}}
    assert bench.bench_config("prune", 0.5, settings).to_dict() == \
        {"ratio": 0.5, "calib": "c.txt", "calib_tokens": 64, "relative": True, "version": 1}
    assert bench.bench_config("random", 0.5, settings).to_dict() == {"ratio": 0.5, "seed": 3, "version": 1}
    # a bad value fails before anything loads or is written
    with pytest.raises(ValueError, match="seed must be an integer"):
        _run(bench_dir, tmp_path / "o.json", ["random"], options={"seed": "x"})
    assert not (tmp_path / "o.json").exists()


def test_cli_bench(bench_dir, tmp_path, capsys):
    out, md = tmp_path / "o.json", tmp_path / "t.md"
    text = str(bench_dir / "text.txt")
    argv = ["bench", "--model", str(bench_dir / "model"), "--ratios", "0,0.25", "--methods", "random,layerwise",
            "--json", str(out), "--text", text, "--calib", text, "--no-probe", "--md", str(md), "--max-tokens", "200",
            "-o", "random.seed=3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed == md.read_text()
    rows = json.loads(out.read_text())
    assert len(rows) == 4 and all(r["tokens"] == 199 and r["max_tokens"] == 200 for r in rows)
    assert all(r["options"] == {"random.seed": 3} for r in rows)
    configs = {(r["method"], r["ratio"]): r["config"] for r in rows}
    assert configs[("random", 0.25)] == {"ratio": 0.25, "seed": 3, "version": 1}
    assert configs[("layerwise", 0.25)] == {"ratio": 0.25, "metric": "qk", "version": 1}
    assert all(r["peak_rss_bytes"] is None for r in rows)  # --no-probe
    assert main(argv) == 2  # exists, no --resume: one line, exit 2
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0


def test_cli_bench_rejects_a_bad_ratio(tmp_path, capsys):
    assert main(["bench", "--json", str(tmp_path / "o.json"), "--ratios", "0,1.5"]) == 2
    assert "1.5" in capsys.readouterr().err and not (tmp_path / "o.json").exists()


def test_sharing_gap_compares_the_best_of_each_kind_at_each_ratio():
    from headshare.bench import sharing_gap

    def row(method, ratio, ppl):
        return {"method": method, "ratio": ratio, "perplexity": ppl, "params_removed": 10, "params_total": 100}

    rows = [row("original", 0.0, 10.0), row("prune", 0.3, 20.0), row("fitprune", 0.3, 16.0),
            row("random", 0.3, 30.0), row("basisshare", 0.3, 15.2), row("fitprune", 0.5, 30.0)]
    (g,) = sharing_gap(rows)  # 0.5 has no sharing row: no comparison
    assert (g["sharing"], g["pruning"]) == ("basisshare", "fitprune")
    assert abs(g["gap"] - (15.2 / 16.0 - 1)) < 1e-12 and g["model_fraction"] == 0.1


def test_bench_rows_of_both_unit_kinds_sit_side_by_side(tmp_path, tiny_checkpoint):
    from headshare.bench import bench_config, budget_groups, resolve_methods, run_bench
    from headshare.methods import split_method

    assert split_method("fitprune@query") == ("fitprune", "query") and split_method("prune") == ("prune", None)
    assert bench_config("random@query", 0.4, {"seed": 0}).unit == "query"
    with pytest.raises(ValueError, match="after '@'"):
        resolve_methods("random@heads")
    tiny_checkpoint(tmp_path / "m")
    kw = dict(max_tokens=64, window=32, run_probe=False, progress=False)
    run_bench(str(tmp_path / "m"), [0.34], ["random"], tmp_path / "b.json", **kw)
    # floor(0.34 x 6) = 2 of 6 kv units (q, k, v rows and o columns: 6 x 8 rows of 32 each) remove what 6 of 12 query heads
    # (2 x 8 rows each) do
    rows = run_bench(str(tmp_path / "m"), [0.5], ["random@query"], tmp_path / "b.json", resume=True, **kw)
    by = {r["method"]: r for r in rows}
    assert by["random"]["units_total"] == 6 and by["random@query"]["units_total"] == 12
    assert by["random"]["attn_params_removed"] == 2 * 6 * 256 == by["random@query"]["attn_params_removed"]
    assert by["random"]["attn_params_total"] == by["random@query"]["attn_params_total"]
    assert [len(g) for g in budget_groups(rows)] == [2]


def test_rows_are_scored_on_every_text(bench_dir, tmp_path):
    first, second = str(bench_dir / "text.txt"), str(tmp_path / "other.txt")
    (tmp_path / "other.txt").write_text("\n".join(reversed(TINY_CORPUS * 12)))
    rows = bench.run_bench(str(bench_dir / "model"), [0, 0.5], ["directshare", "prune"], tmp_path / "o.json",
                           text=[first, second], calib=first, calib_tokens=256, progress=False, run_probe=False)
    for r in rows:
        assert list(r["texts"]) == [first, second] and r["text"] == [first, second]
        assert r["texts"][first]["perplexity"] == r["perplexity"]
        assert r["texts"][second]["perplexity"] != r["perplexity"]
    shared = next(r for r in rows if r["method"] == "directshare" and r["ratio"] == 0.5)
    assert bench.perplexity_on(shared, second) == shared["texts"][second]["perplexity"]
    (g,) = [g for g in bench.sharing_gap(rows, text=second) if g["ratio"] == 0.5]
    assert g["sharing_ppl"] == shared["texts"][second]["perplexity"]
    table = bench.markdown_table(rows)
    assert f"ppl {second} (/ orig)" in table.splitlines()[0]
    scored = shared["texts"][second]
    assert f"{scored['perplexity']:.3f} ({scored['perplexity'] / scored['reference_perplexity']:.3f})" in table
    with pytest.raises(HeadshareError, match="was not scored on 'nope'"):
        bench.perplexity_on(shared, "nope")


def test_cli_bench_takes_several_texts(bench_dir, tmp_path, capsys):
    text = str(bench_dir / "text.txt")
    (tmp_path / "b.txt").write_text("\n".join(reversed(TINY_CORPUS * 12)))
    out = tmp_path / "o.json"
    assert main(["bench", "--model", str(bench_dir / "model"), "--ratios", "0,0.25", "--methods", "prune",
                 "--json", str(out), "--text", text, "--text", str(tmp_path / "b.txt"), "--calib", text,
                 "--no-probe"]) == 0
    rows = json.loads(out.read_text())
    assert all(list(r["texts"]) == [text, str(tmp_path / "b.txt")] for r in rows)
    assert f"ppl {tmp_path / 'b.txt'} (/ orig)" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["mlpprune", "mlpprune+refit", "layerdrop"])
def test_whole_model_alternatives_remove_parameters_and_reload(method, tiny_llama, tiny_tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from headshare.bench.alternatives import budget, remove_whole
    from headshare.methods.calibration import calibration_ids
    from headshare.sharing import unique_parameters

    model = tiny_llama(num_hidden_layers=4)
    (tmp_path / "t.txt").write_text(" ".join(TINY_CORPUS * 40))
    ids = calibration_ids(model, tiny_tokenizer, str(tmp_path / "t.txt"), 256, 64)
    before = unique_parameters(model)[0]
    removed = remove_whole(model, method, 0.5, ids)
    gone = before - unique_parameters(model)[0]
    if method == "layerdrop":  # whole blocks: the nearest count, here one of four
        assert len(removed["layers_dropped"]) == 1 and model.config.num_hidden_layers == 3
        assert gone == sum(p.numel() for p in model.model.layers[0].parameters())
    else:  # 16 channels of 64 in each of 4 blocks, 3 x 32 parameters each: the budget exactly
        assert removed["channels_removed_per_block"] == 16 and gone == budget(tiny_llama(num_hidden_layers=4), 0.5)
        assert ("refits" in removed) == method.endswith("+refit")
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(model(ids[:1]).logits, reloaded(ids[:1]).logits)


def test_mlp_refit_is_the_ridge_least_squares_chosen_on_the_other_fold():
    """down_proj's refit from the folds' Grams equals ridge least squares on the tokens themselves: each fold's
    fit (an augmented least squares toward the original columns) measured on the other fold's tokens, the
    ridge with the least summed error kept and refitted on both folds."""
    import torch

    from headshare.bench.alternatives import RIDGES, _refit

    g = torch.Generator().manual_seed(0)
    inner, hidden, n = 24, 8, 200
    mix = torch.randn(inner, inner, generator=g, dtype=torch.float64)  # correlated channels: a refit can help
    acts = [torch.randn(n, inner, generator=g, dtype=torch.float64) @ mix for _ in range(2)]
    W = torch.randn(hidden, inner, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 11, 14, 15, 17, 20, 22])

    def ridge(a: torch.Tensor, rho: float) -> torch.Tensor:
        ak = a[:, keep]
        lam = rho * (ak.T @ ak).diagonal().mean()
        lhs = torch.cat([ak, lam.sqrt() * torch.eye(len(keep), dtype=a.dtype)])
        rhs = torch.cat([a @ W.T, lam.sqrt() * W[:, keep].T])
        return torch.linalg.lstsq(lhs, rhs).solution.T

    def err(a: torch.Tensor, wk: torch.Tensor) -> float:
        return float(((a @ W.T - a[:, keep] @ wk.T) ** 2).sum())

    want = {rho: err(acts[1], ridge(acts[0], rho)) + err(acts[0], ridge(acts[1], rho)) for rho in RIDGES}
    best = min(want, key=want.get)
    got, info = _refit(W, [a.T @ a for a in acts], keep)
    assert info["ridge"] == best
    assert info["held_out_refit"] == pytest.approx(want[best], rel=1e-9)
    assert info["held_out_unfitted"] == pytest.approx(err(acts[1], W[:, keep]) + err(acts[0], W[:, keep]), rel=1e-9)
    assert want[best] < info["held_out_unfitted"] and got is not None  # the refit pays off here, so it is applied
    torch.testing.assert_close(got, ridge(torch.cat(acts), best), rtol=1e-9, atol=1e-9)
