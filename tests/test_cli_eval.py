"""`headshare eval`: perplexity, KL against a reference, lm-eval tasks, on plain and shared checkpoints."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CORPUS, build_tiny_llama, build_tiny_tokenizer, write_task

import headshare
from headshare.cli import main
from headshare.evaluate import perplexity


def write_models(d, seed: int = 0) -> None:
    """An original tiny Llama (3 layers) in d/orig and its DirectShare-shared copy in d/shared, with the tokenizer."""
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(seed=seed, num_hidden_layers=3)
    model.save_pretrained(d / "orig")
    tok.save_pretrained(d / "orig")
    shared = build_tiny_llama(seed=seed, num_hidden_layers=3)
    headshare.share(shared, headshare.make_plan(shared, 0.5))
    shared.save_pretrained(d / "shared", tokenizer=tok)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """An original tiny Llama, its DirectShare-shared copy (both with the tokenizer) and a text file."""
    d = tmp_path_factory.mktemp("eval")
    write_models(d)
    (d / "text.txt").write_text("\n".join(TINY_CORPUS * 5))
    return d


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_perplexity_json_matches_the_python_api(dirs, capsys):
    got = _eval(capsys, dirs / "orig", "--text", dirs / "text.txt", "--window", 16, "--stride", 8, "--max-tokens", 100)
    assert {"perplexity", "tokens", "nll"} <= set(got) and "kl" not in got
    want = perplexity(build_tiny_llama(num_hidden_layers=3), build_tiny_tokenizer(), (dirs / "text.txt").read_text(),
                      window=16, stride=8, max_tokens=100, progress=False)
    assert got["tokens"] == want["tokens"] == 99
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert (got["window"], got["stride"]) == (16, 8)


def test_shared_checkpoint_against_reference(dirs, capsys):
    text = dirs / "text.txt"
    same = _eval(capsys, dirs / "orig", "--text", text, "--window", 32, "--reference", dirs / "orig")
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    got = _eval(capsys, dirs / "shared", "--text", text, "--window", 32, "--reference", dirs / "orig")
    assert {"perplexity", "tokens", "kl", "top1_agreement"} <= set(got)
    assert got["kl"] > 1e-6 and 0.0 <= got["top1_agreement"] < 1.0
    assert got["reference_perplexity"] == pytest.approx(same["perplexity"], rel=1e-9)
    assert got["perplexity"] != pytest.approx(same["perplexity"], rel=1e-6)


def test_lm_eval_tasks_with_recovery(dirs, tmp_path, capsys):
    # seed 1: the original model answers the first two questions right (seed 0 gets both wrong, and a
    # recovery against a reference accuracy of 0 is no ratio at all)
    write_models(tmp_path, seed=1)
    got = _eval(capsys, tmp_path / "shared", "--text", dirs / "text.txt", "--window", 32, "--reference",
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


def test_human_output_and_errors(dirs, tmp_path, capsys):
    assert main(["eval", str(dirs / "orig"), "--text", str(dirs / "text.txt"), "--window", "32"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    assert main(["eval", str(tmp_path / "missing"), "--json"]) == 2
    assert "missing" in capsys.readouterr().err
    build_tiny_llama().save_pretrained(tmp_path / "no-tok")
    assert main(["eval", str(tmp_path / "no-tok"), "--json"]) == 2
    assert "tokenizer" in capsys.readouterr().err
