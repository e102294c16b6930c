"""`headshare.methods.auto`: candidate plans at one parameter budget, the winner chosen by held-out loss."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_CORPUS, corpus_ids, reloads_identically

import headshare
from headshare.arch import layout_of
from headshare.errors import HeadshareError
from headshare.methods import AutoShareConfig, make_config
from headshare.methods.auto import candidate_ratio, held_out_loss, validation_ids, why_chosen
from headshare.plan import SharePlan, units_for_ratio
from headshare.sharing import unique_parameters

CANDIDATES = "fitprune@kv,basisshare@query,prune@query"


def _cfg(calib, **kw):
    return AutoShareConfig(**{"ratio": 0.34, "calib": calib, "calib_tokens": 96, "val_tokens": 64,
                              "candidates": CANDIDATES, **kw})


def test_keeps_the_candidate_with_the_least_held_out_loss(tiny_tokenizer, calib_file, tiny_model):
    model = tiny_model("llama-gqa")
    before = copy.deepcopy(model.state_dict())
    cfg = _cfg(calib_file)
    plan = headshare.make_plan(model, cfg, tokenizer=tiny_tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "make_plan edited the model"
    scores = plan.notes["candidates"]
    assert [s["candidate"] for s in scores] == CANDIDATES.split(",")
    best = min(scores, key=lambda s: s["val_loss"])
    assert plan.notes["chosen"] == best["candidate"] and plan.method == "autoshare"
    assert plan.notes["why"] == why_chosen(scores, best["candidate"])
    method, unit = best["candidate"].split("@")
    assert plan.unit_kind == unit
    # the winner is exactly that candidate's plan, and its score is what its shared model gets
    again = headshare.make_plan(model, make_config(method, best["ratio"], unit=unit, calib=calib_file,
                                                   calib_tokens=96), tokenizer=tiny_tokenizer)
    assert again.pruned == plan.pruned and again.bases == plan.bases and sorted(again.fitted) == sorted(plan.fitted)
    assert all(torch.equal(again.fitted[k], plan.fitted[k]) for k in plan.fitted)
    val = validation_ids(tiny_tokenizer, cfg)
    shared = headshare.share(copy.deepcopy(model), plan)
    assert held_out_loss(shared, val) == pytest.approx(best["val_loss"], abs=1e-6)
    # the scored tokens come after the fitted ones
    from headshare.data import load_text, tokenize

    ids = tokenize(tiny_tokenizer, load_text(calib_file, split="calib"), bos=False)
    assert torch.equal(val.flatten(), ids[96:96 + val.numel()])


def test_why_names_the_unit_kind_and_the_margins():
    scores = [{"candidate": "choiceshare@query", "val_loss": 2.8}, {"candidate": "basisshare@kv", "val_loss": 2.9},
              {"candidate": "prune@kv", "val_loss": 3.0}, {"candidate": "prune@query", "val_loss": 2.85}]
    why = why_chosen(scores, "choiceshare@query")
    assert why.startswith("query heads: choiceshare@query has the least held-out loss (2.8000)")
    # exp(0.1) - 1 = 10.5 % below the best key/value candidate; exp(0.05) - 1 = 5.1 % below the next query one
    assert "10.5 % below the best on key/value units, basisshare@kv (2.9000)" in why
    assert "5.1 % below the next on query heads, prune@query (2.8500)" in why
    alone = why_chosen(scores[1:3], "basisshare@kv")
    assert alone.startswith("key/value units: basisshare@kv") and alone.endswith("no candidate on query heads ran")


def test_every_candidate_removes_at_least_the_budget(tiny_tokenizer, calib_file, tiny_model):
    model = tiny_model("llama-gqa")
    kv, q = layout_of(model.config, "kv"), layout_of(model.config, "query")
    budget = units_for_ratio(0.34, kv) * kv.unit_params()
    r = candidate_ratio(model, budget, "query")
    n = units_for_ratio(r, q)
    assert n * q.unit_params() >= budget > (n - 1) * q.unit_params()
    p0, _ = unique_parameters(model)
    for cand in CANDIDATES.split(","):
        plan = headshare.make_plan(tiny_model("llama-gqa"), _cfg(calib_file, candidates=cand), tokenizer=tiny_tokenizer)
        shared = headshare.share(tiny_model("llama-gqa"), plan)
        assert p0 - unique_parameters(shared)[0] >= budget, cand


def test_the_plan_saves_shares_and_reloads(tiny_tokenizer, calib_file, tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    plan = headshare.make_plan(model, _cfg(calib_file), tokenizer=tiny_tokenizer)
    plan.save(tmp_path / "p.json")
    again = SharePlan.load(tmp_path / "p.json")
    assert again.notes["chosen"] == plan.notes["chosen"] and again.unit_kind == plan.unit_kind
    headshare.share(model, again)
    reloads_identically(model, corpus_ids(tiny_tokenizer, 32), tmp_path / "s")


def test_ratio_zero_is_the_unchanged_model(tiny_tokenizer, calib_file, tiny_model):
    plan = headshare.make_plan(tiny_model("llama-gqa"), _cfg(calib_file, ratio=0.0), tokenizer=tiny_tokenizer)
    assert plan.pruned == [] and plan.assignments == [] and plan.bases == []


def test_refusals(tiny_tokenizer, calib_file, tiny_model):
    with pytest.raises(ValueError, match="candidates"):
        AutoShareConfig(ratio=0.3, candidates="nosuch@kv")
    with pytest.raises(ValueError, match="candidates"):
        AutoShareConfig(ratio=0.3, candidates="autoshare@kv")
    with pytest.raises(ValueError, match="candidates"):
        AutoShareConfig(ratio=0.3, candidates="prune@head")
    with pytest.raises(ValueError, match="candidates"):
        AutoShareConfig(ratio=0.3, candidates=" , ")
    with pytest.raises(ValueError, match="val_tokens"):
        AutoShareConfig(ratio=0.3, val_tokens=1)
    with pytest.raises(ValueError, match="val_tokens"):  # the text is too short for both parts
        headshare.make_plan(tiny_model("llama-gqa"), _cfg(calib_file, val_tokens=10**6), tokenizer=tiny_tokenizer)


def test_validation_text_of_another_kind(tiny_tokenizer, tmp_path):
    from headshare.data import load_text, tokenize

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(TINY_CORPUS * 40))
    b.write_text(" ".join(reversed(TINY_CORPUS * 40)))
    ids_a, ids_b = (tokenize(tiny_tokenizer, load_text(str(p)), bos=False) for p in (a, b))
    same = AutoShareConfig(ratio=0.5, calib=str(a), calib_tokens=256, val_tokens=128)
    assert torch.equal(validation_ids(tiny_tokenizer, same).flatten(), ids_a[256:384])  # after the fits' tokens
    other = AutoShareConfig(ratio=0.5, calib=str(a), calib_tokens=256, val_tokens=128, val=str(b))
    assert torch.equal(validation_ids(tiny_tokenizer, other).flatten(), ids_b[:128])  # from its start
    mixed = AutoShareConfig(ratio=0.5, calib=f"{a}+{b}", calib_tokens=256, val_tokens=128)
    assert torch.equal(validation_ids(tiny_tokenizer, mixed).flatten(), torch.cat([ids_a[128:192], ids_b[128:192]]))
    with pytest.raises(HeadshareError, match="val must be a text source whose calib half"):
        AutoShareConfig(ratio=0.5, val="builtin:calib+news:eval")


def test_the_plan_says_what_it_was_scored_on(tiny_model, tiny_tokenizer, tmp_path):
    (tmp_path / "v.txt").write_text(" ".join(reversed(TINY_CORPUS * 40)))
    model = tiny_model("llama-gqa")
    plan = headshare.make_plan(model, AutoShareConfig(ratio=0.5, calib_tokens=256, val_tokens=128,
                                                      val=str(tmp_path / "v.txt")), tokenizer=tiny_tokenizer)
    assert plan.notes["val_text"] == str(tmp_path / "v.txt") and plan.config["val"] == str(tmp_path / "v.txt")
    # chosen on another text, each candidate also carries its loss on the calibration text's kind: that of
    # its plan on the tokens after calib_tokens, what the default would have chosen on
    same = validation_ids(tiny_tokenizer, AutoShareConfig(ratio=0.5, calib_tokens=256, val_tokens=128))
    for c in plan.notes["candidates"]:
        assert c["calib_loss"] != c["val_loss"]
    kept = next(c for c in plan.notes["candidates"] if c["candidate"] == plan.notes["chosen"])
    assert held_out_loss(headshare.share(copy.deepcopy(model), plan), same) == pytest.approx(kept["calib_loss"],
                                                                                          abs=1e-6)
    default = headshare.make_plan(tiny_model("llama-gqa"), AutoShareConfig(ratio=0.5, calib_tokens=256,
                                                                           val_tokens=128), tokenizer=tiny_tokenizer)
    assert default.notes["val_text"] == "builtin:calib (after calib_tokens)"
    assert all("calib_loss" not in c for c in default.notes["candidates"])  # its val_loss is that already


def test_fitprune_and_basisshare_weigh_the_pruning_costs_once(tiny_tokenizer, calib_file, tiny_model, monkeypatch):
    """Inside autoshare the pruning costs both candidates weigh (same layer, units, ridge and data) are
    computed once, and each candidate still makes the plan it makes alone."""
    from headshare.methods import fitshare

    model = tiny_model("llama-gqa")
    calls = []
    real = fitshare.heldout_prune_costs
    monkeypatch.setattr(fitshare, "heldout_prune_costs", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = _cfg(calib_file, candidates="fitprune@kv,basisshare@kv")
    plan = headshare.make_plan(model, cfg, tokenizer=tiny_tokenizer)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers  # fitprune computed them; basisshare read them
    calls.clear()
    val = validation_ids(tiny_tokenizer, cfg)
    for score in plan.notes["candidates"]:
        method, unit = score["candidate"].split("@")
        alone = headshare.make_plan(model, make_config(method, score["ratio"], unit=unit, calib=calib_file,
                                                       calib_tokens=96), tokenizer=tiny_tokenizer)
        assert held_out_loss(headshare.share(copy.deepcopy(model), alone), val) == pytest.approx(
            score["val_loss"], abs=1e-6)
    assert len(calls) == 2 * layers  # alone, each computes its own
