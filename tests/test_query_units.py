"""Query-head units (`unit="query"`): one query head and its o columns per unit, key/value heads kept per
layer. Exact savings, exact forward, exact save/load, the plan's unit kind, every method and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from archs import copy_in, outputs, tiny_model
from conftest import build_tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig

import headshare
from headshare.arch import UnsupportedModelError, blocks, layout_of
from headshare.cli import main
from headshare.methods.calibration import borrowed_z, capture, source_key
from headshare.plan import PLAN_VERSION, Assignment, SharePlan, new_plan
from headshare.sharing import unique_parameters

IDS = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(1))
CALIBRATED = ["prune", "actshare", "fitprune", "fitshare", "basisshare", "choiceshare"]


def test_smollm2_layout_has_270_query_units():
    cfg = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    kv, q = layout_of(cfg), layout_of(cfg, "query")
    assert (kv.units_per_layer, kv.units_total, q.units_per_layer, q.units_total) == (3, 90, 9, 270)
    assert [p.path for p in q.projections()] == ["self_attn.q_proj", "self_attn.o_proj"]
    assert q.unit_params() == 2 * 64 * 576 and kv.unit_params() == 8 * 64 * 576
    assert [q.kv_group(u) for u in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [kv.kv_group(u) for u in range(3)] == [0, 1, 2]
    assert layout_of(cfg, "kv") == kv  # an unshared model's units are the default unless asked for


def test_bad_unit_kinds_are_refused():
    with pytest.raises(ValueError, match="unit must be one of kv, query"):
        layout_of(tiny_model("llama-gqa").config, "heads")
    with pytest.raises(UnsupportedModelError, match="separate q/k/v"):
        layout_of(tiny_model("gpt2").config, "query")
    with pytest.raises(ValueError, match="unit must be one of"):
        headshare.make_plan(tiny_model("llama-gqa"), 0.3, "random", unit="head")


@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mha", "qwen2-bias", "qwen3-norm", "gemma"])
@pytest.mark.parametrize("method", ["directshare", "random", "layerwise"])
def test_forward_equals_copied_query_heads_and_savings_are_exact(arch, method):
    model = tiny_model(arch)
    plan = headshare.make_plan(model, 0.5, method, unit="query")
    layout = layout_of(model.config, "query")
    assert plan.unit_kind == "query" and plan.layout["units_per_layer"] == model.config.num_attention_heads
    reference = copy.deepcopy(model)
    copy_in(reference, plan)
    shared = copy.deepcopy(model)
    params0, bytes0 = unique_parameters(shared)
    headshare.share(shared, plan)
    params1, bytes1 = unique_parameters(shared)
    q_bias = blocks(model)[0].self_attn.q_proj.bias is not None
    per_unit = layout.unit_params({"self_attn.q_proj": q_bias})
    assert params0 - params1 == plan.units_removed * per_unit == 6 * per_unit
    assert bytes0 - bytes1 == 4 * (params0 - params1)
    assert torch.equal(outputs(shared, IDS), outputs(reference, IDS))
    # k and v are untouched modules: every layer keeps its key/value heads
    for a, b in zip(blocks(shared), blocks(model), strict=True):
        assert torch.equal(a.self_attn.k_proj.weight, b.self_attn.k_proj.weight)


def test_ratio_zero_is_bit_identical():
    model = tiny_model("llama-gqa")
    before = outputs(model, IDS)
    headshare.share(model, headshare.make_plan(model, 0.0, unit="query"))
    assert torch.equal(outputs(model, IDS), before)


def test_planted_duplicate_query_head_is_found_and_shared_at_no_cost():
    model = tiny_model("llama-gqa")  # 4 query heads, 2 key/value heads, head_dim 8
    bl = blocks(model)
    with torch.no_grad():  # layer 2's query head 3 is layer 0's: q rows and o columns
        bl[2].self_attn.q_proj.weight[24:32] = bl[0].self_attn.q_proj.weight[24:32]
        bl[2].self_attn.o_proj.weight[:, 24:32] = bl[0].self_attn.o_proj.weight[:, 24:32]
    before = outputs(model, IDS)
    plan = headshare.make_plan(model, 1 / 12, "directshare", unit="query")  # one unit of 12
    (a,) = plan.assignments
    assert (a.layer, a.unit, a.source_layer, a.source_unit) == (2, 3, 0, 3)
    assert a.score == pytest.approx(1.0)
    headshare.share(model, plan)
    assert torch.equal(outputs(model, IDS), before)


def test_save_load_and_trust_remote_code_are_bit_identical(tmp_path):
    model = tiny_model("qwen2-bias")
    plan = headshare.make_plan(model, 0.5, "random", unit="query", seed=3)
    headshare.share(model, plan)
    model.save_pretrained(tmp_path / "m")
    ref = outputs(model, IDS)
    assert torch.equal(outputs(headshare.load(tmp_path / "m"), IDS), ref)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert torch.equal(outputs(remote, IDS), ref)
    s = headshare.info(tmp_path / "m")
    assert s["unit_kind"] == "query" and s["units_total"] == 12 and s["units_shared"] == 6
    assert "query head" in s["unit"]
    assert s["params_original"] - s["params_shared"] == 6 * (2 * 8 * 32 + 8)  # q rows and bias, o columns


def test_plan_file_keeps_the_unit_kind_and_share_reads_it(tmp_path):
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


def test_borrowed_query_head_attends_with_the_key_value_head_of_its_slot(tiny_tokenizer):
    """The features a calibrated method fits are those `share` computes: a query head borrowed into a slot
    of key/value head g attends with this layer's head g."""
    model = build_tiny_llama(num_hidden_layers=3)  # 4 query heads, 2 key/value heads
    ids = torch.randint(4, 50, (1, 16), generator=torch.Generator().manual_seed(0))
    layout = layout_of(model.config, "query")
    data = capture(model, ids)
    keys = [source_key(layout, (0, 1), 3), source_key(layout, (0, 1), 0)]
    assert keys == [(0, 1, 1), (0, 1, 0)]
    z = borrowed_z(model, data[2], layout, 2, keys)
    for unit, key in ((3, keys[0]), (0, keys[1])):
        plan = new_plan(model, "manual", 0.0, unit_kind="query", assignments=[Assignment(2, unit, 0, 1)])
        assert plan.unit_kind == "query"
        shared = headshare.share(copy.deepcopy(model), plan)
        got = {}
        o = blocks(shared)[2].self_attn.o_proj
        h = o.register_forward_pre_hook(lambda _m, args, got=got: got.__setitem__("z", args[0]))
        with torch.no_grad():
            shared(ids)
        h.remove()
        want = got["z"].reshape(-1, 32)[:, unit * 8:(unit + 1) * 8]
        assert torch.allclose(z[key].float(), want, atol=1e-5)


@pytest.mark.parametrize("method", CALIBRATED)
def test_calibrated_methods_remove_exactly_their_budget(method, tiny_tokenizer):
    model = build_tiny_llama(num_hidden_layers=4)
    plan = headshare.make_plan(model, 0.5, method, unit="query", tokenizer=tiny_tokenizer, calib_tokens=256)
    assert plan.unit_kind == "query" and plan.layout["units_per_layer"] == 4
    shared = copy.deepcopy(model)
    p0 = unique_parameters(shared)[0]
    headshare.share(shared, plan)
    removed = p0 - unique_parameters(shared)[0]
    if method == "basisshare":  # a basis spends the budget to within its last rank
        assert 8 * 512 <= removed <= 1.05 * 8 * 512
    elif method == "choiceshare":  # ranks from a grid: at least the budget
        assert removed >= 8 * 512
    else:
        assert removed == 8 * 512
    assert torch.isfinite(outputs(shared, IDS)).all()


def test_selection_on_many_units_a_layer_weighs_nested_subsets(tiny_tokenizer):
    """With more units a layer than `EXHAUSTIVE` the knapsack sees nested subsets, one per size."""
    from headshare.methods.calibration import layer_gram
    from headshare.methods.lstsq import EXHAUSTIVE, candidate_subsets

    model = build_tiny_llama(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    ids = torch.randint(4, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    layout = layout_of(model.config, "query")
    gram = layer_gram(model, capture(model, ids)[1], layout, 1, [])
    assert layout.units_per_layer == 8 > EXHAUSTIVE
    subsets = candidate_subsets(gram, 8, 1.0)
    assert [len(s) for s in subsets] == list(range(1, 9))
    assert all(set(a) < set(b) for a, b in zip(subsets, subsets[1:], strict=False))
    plan = headshare.make_plan(model, 0.25, "fitprune", unit="query", tokenizer=tiny_tokenizer, calib_tokens=256)
    assert len(plan.pruned) == 4


def test_posttrain_keeps_query_heads_tied(tmp_path, tiny_tokenizer):
    from conftest import TINY_CORPUS

    from headshare.data import token_blocks
    from headshare.posttrain import PostTrainConfig, posttrain

    model = build_tiny_llama(num_hidden_layers=3)
    plan = headshare.make_plan(model, 0.3, "directshare", unit="query")
    data = token_blocks(tiny_tokenizer, "\n".join(TINY_CORPUS * 12), 16)
    cfg = PostTrainConfig(steps=3, block_size=16, batch_size=2, lr=1e-2, save_steps=2, progress=False,
                          out=str(tmp_path / "out"))
    model = posttrain(model, tiny_tokenizer, plan, data, cfg)
    loaded = headshare.load(tmp_path / "out")
    assert torch.equal(outputs(loaded, IDS % 50), outputs(model, IDS % 50))
    assert headshare.info(tmp_path / "out")["unit_kind"] == "query"
    for a in plan.assignments:  # the borrower reads the source layer's q rows: one tensor, not a copy
        q = blocks(loaded)[a.layer].self_attn.q_proj
        assert any(seg[0] is blocks(loaded)[a.source_layer].self_attn.q_proj for seg in q._segments)
        assert q.weight is None or q.weight.shape[0] < 32


def test_cli_plan_and_share_with_query_units(tmp_path, capsys):
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


def test_bench_rows_of_both_unit_kinds_sit_side_by_side(tmp_path):
    from headshare.bench import bench_config, budget_groups, resolve_methods, run_bench
    from headshare.methods import split_method

    assert split_method("fitprune@query") == ("fitprune", "query") and split_method("prune") == ("prune", None)
    assert bench_config("random@query", 0.4, {"seed": 0}).unit == "query"
    with pytest.raises(ValueError, match="after '@'"):
        resolve_methods("random@heads")
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "m")
    from conftest import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path / "m")
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
