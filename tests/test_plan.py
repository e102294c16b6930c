"""`headshare.plan`: the paper's dynamic selection, plan files (fitted weights, unit kinds), validation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import IDS, outputs

import headshare
from headshare.arch import layout_of
from headshare.plan import PLAN_VERSION, Assignment, SharePlan, dynamic_selection, new_plan, units_for_ratio


def test_unit_count_is_floor_of_ratio_times_all_units(tiny_model):
    layout = layout_of(tiny_model("llama-gqa").config)  # 3 layers x 2 units
    assert [units_for_ratio(r, layout) for r in (0, 0.1, 0.17, 0.34, 0.5, 0.66)] == [0, 0, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="only 4 units"):
        units_for_ratio(0.9, layout)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
            units_for_ratio(bad, layout)


def test_paper_ratio_on_smollm2_shape_gives_27_units():
    from headshare.arch import Layout
    assert units_for_ratio(0.3, Layout("llama", 30, 9, 3, 64, 576)) == 27


def test_dynamic_selection_takes_the_most_similar_proposals(tiny_model):
    layout = layout_of(tiny_model("llama-gqa").config)
    sim = torch.zeros(6, 6)
    sim[5, 0] = sim[0, 5] = 0.9   # (2,1) ~ (0,0)
    sim[2, 1] = sim[1, 2] = 0.5   # (1,0) ~ (0,1)
    sim[4, 3] = sim[3, 4] = 0.7   # (2,0) ~ (1,1)
    chosen = dynamic_selection(sim, layout, 0.34)  # 2 units
    assert [(a.layer, a.unit, a.source_layer, a.source_unit) for a in chosen] == [(2, 0, 1, 1), (2, 1, 0, 0)]
    # the number per layer is whatever the ranking gives: here both come from layer 2
    assert [a.score for a in chosen] == [pytest.approx(0.7), pytest.approx(0.9)]


def test_plan_is_deterministic_and_round_trips(tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    p1 = headshare.make_plan(model, 0.5)
    p2 = headshare.make_plan(model, 0.5)
    assert p1.to_dict() == p2.to_dict()
    p1.save(tmp_path / "plan.json")
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["version"] == PLAN_VERSION == 5 and d["method"] == "directshare" and d["metric"] == "qk"
    assert d["config"] == {"ratio": 0.5, "metric": "qk", "version": 1}  # the method config it ran with
    assert d["fitted"] == [] and d["base_sha1"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no weights file for a plan without fitted ones
    assert SharePlan.load(tmp_path / "plan.json").to_dict() == p1.to_dict()


def test_fitted_weights_travel_beside_the_plan(tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    fitted = {"1.self_attn.o_proj.unit0": torch.randn(32, 16), "2.self_attn.o_proj.unit1": torch.randn(32, 16)}
    plan = new_plan(model, "manual", 0.0, assignments=[Assignment(2, 0, 0, 1)], fitted=fitted, base_sha1="ab" * 20)
    assert plan.fitted_names == sorted(fitted)
    plan.save(tmp_path / "p.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.safetensors"]
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["fitted"] == sorted(fitted) and d["base_sha1"] == "ab" * 20
    back = SharePlan.load(tmp_path / "p.json")
    assert back.to_dict() == plan.to_dict()
    assert back.fitted.keys() == fitted.keys() and all(torch.equal(back.fitted[k], v) for k, v in fitted.items())
    back.validate(layout_of(model.config))
    # the document alone names weights it does not carry: refused, and so is a missing weights file
    with pytest.raises(ValueError, match="carries none"):
        SharePlan.from_dict(d).validate(layout_of(model.config))
    (tmp_path / "p.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="p.safetensors"):
        SharePlan.load(tmp_path / "p.json")
    with pytest.raises(ValueError, match=".json name"):
        plan.save(tmp_path / "p.safetensors")


def test_damaged_fitted_weights_file_is_one_clear_error(tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    plan = new_plan(model, "manual", 0.0, fitted={"1.self_attn.o_proj.unit0": torch.randn(32, 16)})
    plan.save(tmp_path / "p.json")
    data = (tmp_path / "p.safetensors").read_bytes()
    (tmp_path / "p.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="p.safetensors: not a readable safetensors file") as e:
        SharePlan.load(tmp_path / "p.json")
    assert "\n" not in str(e.value)


def test_version_1_plans_still_load_but_not_a_fitted_one(tiny_model):
    model = tiny_model("llama-gqa")
    layout = layout_of(model.config)
    d = {"layout": layout.to_dict(), "method": "directshare", "ratio": 0.2, "version": 1,
         "assignments": [{"layer": 1, "unit": 0, "source_layer": 0, "source_unit": 1}], "notes": {}}
    plan = SharePlan.from_dict(d)
    plan.validate(layout)
    assert plan.roots() == {(1, 0): (0, 1)} and plan.fitted == {}
    # a version 1 fitshare plan could not carry its edited weights: applied without them it would break the model
    fitted_v1 = SharePlan.from_dict({**d, "method": "fitshare", "notes": {"requires_weights": "method-fitted"}})
    with pytest.raises(ValueError, match="fitted weights but carries none"):
        fitted_v1.validate(layout)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layout"].update(num_layers=7), "does not fit"),
    (lambda d: d["assignments"].append(dict(layer=1, unit=0, source_layer=2, source_unit=0)), "earlier layer"),
    (lambda d: d["assignments"].append(dict(layer=2, unit=5, source_layer=0, source_unit=0)), "outside"),
    (lambda d: d["assignments"].extend([dict(layer=2, unit=0, source_layer=0, source_unit=0)] * 2), "twice"),
    (lambda d: d.update(pruned=[[0, 0]]) or d["assignments"].append(
        dict(layer=1, unit=0, source_layer=0, source_unit=0)), "pruned"),
])
def test_plans_that_do_not_fit_are_refused(edit, message, tiny_model):
    model = tiny_model("llama-gqa")
    d = new_plan(model, "manual", 0.0).to_dict()
    edit(d)
    with pytest.raises(ValueError, match=message):
        SharePlan.from_dict(d).validate(layout_of(model.config))


def test_unreadable_plans_are_refused(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SharePlan.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a headshare plan"):
        SharePlan.from_dict({"hello": 1})
    with pytest.raises(ValueError, match="newer"):
        SharePlan.from_dict({"layout": {}, "assignments": [], "version": 99})


def test_roots_follow_chains(tiny_model):
    model = tiny_model("llama-gqa")
    plan = new_plan(model, "manual", 0.0, assignments=[Assignment(2, 0, 1, 1), Assignment(1, 1, 0, 0)])
    assert plan.roots() == {(2, 0): (0, 0), (1, 1): (0, 0)}


def test_plan_file_keeps_the_unit_kind_and_share_reads_it(tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    plan = headshare.make_plan(model, 0.5, "random", unit="query", seed=1)
    plan.save(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["layout"]["unit_kind"] == "query" and d["config"]["unit"] == "query" and d["version"] == PLAN_VERSION
    loaded = SharePlan.load(tmp_path / "p.json")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    headshare.share(a, plan)
    headshare.share(b, loaded)  # no unit given anywhere: the plan says it
    assert torch.equal(outputs(a, IDS), outputs(b, IDS))
    with pytest.raises(ValueError, match="plan cuts 'query' units, this layout 'kv' units"):
        loaded.validate(layout_of(model.config, "kv"))
    d["layout"]["unit_kind"] = "head"
    with pytest.raises(ValueError, match="unit_kind"):
        SharePlan.from_dict(d)
    # a plan from before unit kinds is a kv plan
    del d["layout"]["unit_kind"]
    assert SharePlan.from_dict(d).unit_kind == "kv"
