"""`headshare.methods.basis`: basisshare and choiceshare, shared input-side bases.

Exact parameter accounting, bit-exact share/save/load, the held-out choice, refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import corpus_ids, outputs, reloads_identically

import headshare
from headshare.arch import blocks, layout_of
from headshare.checkpoint import info
from headshare.methods import BasisShareConfig, ChoiceShareConfig
from headshare.methods.basis.bases import rank_for_budget, whitened_basis
from headshare.methods.basis.heldout import allocate
from headshare.plan import SharePlan, units_for_ratio
from headshare.sharing import BASIS_NAME, SharedBasis, unique_parameters
from headshare.units import basis_key, coef_key

ARCHS = ("llama-gqa", "llama-mha", "llama-mqa", "qwen2-bias", "qwen3-norm", "gpt2")


def _expected_removed(model, plan, layout) -> tuple[int, int]:
    """(parameters the plan's tensors say it removes, parameters one more rank of every basis costs): pruned
    units gone with their biases, each basis once, coefficients per layer. Read before sharing."""
    U, H = layout.units_per_layer, layout.hidden_size
    bias = {p.path: blocks(model)[0].get_submodule(p.path).bias is not None for p in layout.projections()}
    pruned = {tuple(p) for p in plan.pruned}
    expect, per_rank = len(pruned) * layout.unit_params(bias), 0
    for b in plan.bases:
        rows = sum(p.unit_width * sum((layer, u) not in pruned for u in range(U))
                   for layer in b["layers"] for p in layout.in_projections())
        if b.get("kv"):  # k/v that no unit owns: all their rows, whatever is pruned
            rows += len(b["layers"]) * sum(p.unit_width for p in layout.layer_projections())
        expect += rows * H - b["rank"] * (H + rows)
        per_rank += H + rows
    return expect, per_rank


def _plan(model, tok, calib, ratio=0.5, config=BasisShareConfig, **kw):
    return headshare.make_plan(model, config(ratio=ratio, calib=calib, calib_tokens=128, **kw), tokenizer=tok)


@pytest.mark.parametrize("arch", ARCHS)
def test_removes_at_least_the_units_budget_and_counts_every_parameter(arch, tiny_tokenizer, calib_file,
                                                                      tiny_model):
    model = tiny_model(arch)
    layout = layout_of(model.config)
    before = copy.deepcopy(model.state_dict())
    plan = _plan(model, tiny_tokenizer, calib_file, prune=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "make_plan edited the model"
    assert plan.bases and all(b["rank"] >= 1 for b in plan.bases)
    budget = units_for_ratio(0.5, layout) * layout.unit_params()
    p0, b0 = unique_parameters(model)
    expect, per_rank = _expected_removed(model, plan, layout)
    headshare.share(model, plan)
    p1, b1 = unique_parameters(model)
    assert p0 - p1 == expect
    assert b0 - b1 == 4 * expect  # float32
    assert expect >= budget
    assert expect - budget < per_rank  # the largest rank that meets the budget: one more would miss it
    assert torch.isfinite(outputs(model, corpus_ids(tiny_tokenizer))).all()


def test_the_basis_is_stored_once_and_read_by_every_layer_of_its_group(tiny_tokenizer, calib_file,
                                                                       tiny_model):
    model = tiny_model("llama-gqa")
    plan = _plan(model, tiny_tokenizer, calib_file, group=3, prune=0.0)
    assert [b["layers"] for b in plan.bases] == [[0, 1, 2]]
    headshare.share(model, plan)
    found = [m for m in model.modules() if isinstance(m, SharedBasis)]
    assert len(found) == 1
    assert getattr(blocks(model)[0].self_attn, BASIS_NAME) is found[0]
    for block in blocks(model):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert getattr(block.self_attn, name)._basis is found[0]
    keys = [k for k in model.state_dict() if BASIS_NAME in k]
    assert keys == [f"model.layers.0.self_attn.{BASIS_NAME}.weight"]


@pytest.mark.parametrize("unit", ["kv", "query"])
def test_forward_is_what_the_plan_tensors_compute(unit, tiny_tokenizer, calib_file, tiny_model):
    """A q/k/v output of a basis layer is x @ basis^T @ coef^T on the kept rows and zero on pruned rows (with
    query-head units, only q rows are on the bases)."""
    model = tiny_model("llama-gqa")
    layout = layout_of(model.config, unit)
    plan = _plan(model, tiny_tokenizer, calib_file, prune=0.5, unit=unit)
    assert plan.based_rows(layout) == ("q/k/v" if unit == "kv" else "q")
    assert not any("kv" in b for b in plan.bases)
    headshare.share(model, plan)
    x = torch.randn(5, layout.hidden_size)
    g = plan.basis_layers()
    pruned = {tuple(p) for p in plan.pruned}
    whole = layout.layer_projections()
    for layer, gi in g.items():
        basis = plan.fitted[basis_key(gi)]
        for p in plan.basis_projections(layout, gi):
            mod = blocks(model)[layer].get_submodule(p.path)
            assert mod._basis is getattr(blocks(model)[min(plan.bases[gi]["layers"])].self_attn, BASIS_NAME)
            y = mod(x)
            own = [0] if p in whole else [u for u in range(layout.units_per_layer) if (layer, u) not in pruned]
            w = p.unit_width
            if own:
                want = x @ basis.T @ plan.fitted[coef_key(layer, p.path)].T
                got = torch.cat([y[:, u * w:(u + 1) * w] for u in own], 1)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for u in range(layout.units_per_layer):
                if (layer, u) in pruned and p not in whole:
                    assert not y[:, u * w:(u + 1) * w].any()


def test_full_rank_basis_changes_nothing(tiny_tokenizer):
    """The whitened factorisation at full rank reproduces the weights (the basis loses only what rank cuts)."""
    torch.manual_seed(0)
    x = torch.randn(200, 16, dtype=torch.float64)
    w = torch.randn(24, 16, dtype=torch.float64)
    basis, coef_map = whitened_basis(x.T @ x, [w], 16)
    torch.testing.assert_close(w @ coef_map @ basis, w)
    # a lower rank is the best one in the whitened norm: better on x than the plain SVD of w
    b8, m8 = whitened_basis(x.T @ x, [w], 8)
    u, s, vh = torch.linalg.svd(w)
    plain = (u[:, :8] * s[:8]) @ vh[:8]
    assert (x @ (w - w @ m8 @ b8).T).norm() <= (x @ (w - plain).T).norm()


def test_basis_from_pieces_is_the_basis_of_the_stacked_rows():
    """Rows given piece by piece (never stacked: more rows than the hidden size go through their summed Gram)
    give the basis and coefficients that the SVD of all rows at once gives."""
    torch.manual_seed(1)
    x = torch.randn(300, 16, dtype=torch.float64)
    pieces = [torch.randn(n, 16, dtype=torch.float64) for n in (6, 9, 12)]  # 27 rows > 16: the Gram route
    basis, coef_map = whitened_basis(x.T @ x, iter(pieces), 5)
    w = torch.cat(pieces)
    g = x.T @ x + 1e-6 * (x.T @ x).diagonal().mean() * torch.eye(16, dtype=torch.float64)
    s = torch.linalg.cholesky(g)
    u = torch.linalg.svd(s.T @ w.T, full_matrices=False)[0][:, :5]
    want = torch.linalg.solve_triangular(s.T, u, upper=True).T
    # the same rank-5 map of every row (a basis is defined up to the signs of its vectors)
    torch.testing.assert_close(w @ coef_map @ basis, (s.T @ w.T).T @ u @ want)
    assert (x @ (w - w @ coef_map @ basis).T).norm() < (x @ w.T).norm()


def test_rank_for_budget_is_the_largest_that_meets_it():
    dense = [(32, 96), (32, 96)]
    for budget in (1, 500, 3000, 5000):
        r = rank_for_budget(dense, budget)
        assert sum(h * n - r * (h + n) for h, n in dense) >= budget
        assert sum(h * n - (r + 1) * (h + n) for h, n in dense) < budget


@pytest.mark.parametrize("unit", ["kv", "query"])
@pytest.mark.parametrize("select", ["fixed", "heldout"])
def test_share_save_load_round_trip_is_bit_exact(select, unit, tiny_tokenizer, calib_file, tmp_path,
                                                 tiny_model):
    model = tiny_model("llama-gqa")
    plan = _plan(model, tiny_tokenizer, calib_file, prune=0.5, group=1, unit=unit,
                 config=ChoiceShareConfig if select == "heldout" else BasisShareConfig)
    assert plan.bases, "nothing to round-trip"
    headshare.share(model, plan)
    ids = corpus_ids(tiny_tokenizer)
    again = reloads_identically(model, ids, tmp_path / "s")
    assert unique_parameters(again) == unique_parameters(model)
    s = info(tmp_path / "s")
    assert s["bases"] == len(plan.bases) and s["based_rows"] == ("q/k/v" if unit == "kv" else "q")
    assert s["units_based"] == plan.units_based(layout_of(model.config).units_per_layer) > 0
    assert s["units_pruned"] == len(plan.pruned)
    assert s["params_shared"] == unique_parameters(model)[0]
    # and through transformers' own loader
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "s", trust_remote_code=True)
    assert torch.equal(outputs(hf, ids), outputs(model, ids))


def test_plan_file_round_trip_and_share_from_it(tiny_tokenizer, calib_file, tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    plan = _plan(model, tiny_tokenizer, calib_file)
    plan.save(tmp_path / "p.json")
    again = SharePlan.load(tmp_path / "p.json")
    assert again.bases == plan.bases and sorted(again.fitted) == sorted(plan.fitted)
    a, b = headshare.share(copy.deepcopy(model), plan), headshare.share(copy.deepcopy(model), again)
    ids = corpus_ids(tiny_tokenizer)
    assert torch.equal(outputs(a, ids), outputs(b, ids))


def test_basis_gradients_reach_one_tensor_through_every_layer(tiny_tokenizer, calib_file, tiny_model):
    """Post-training a based model trains one basis per group: the tie holds through an optimiser step."""
    model = tiny_model("llama-gqa")
    headshare.share(model, _plan(model, tiny_tokenizer, calib_file, group=3, prune=0.0))
    basis = getattr(blocks(model)[0].self_attn, BASIS_NAME)
    before = basis.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(input_ids=corpus_ids(tiny_tokenizer), labels=corpus_ids(tiny_tokenizer))
    out.loss.backward()
    assert basis.weight.grad is not None and basis.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(basis.weight, before)
    for block in blocks(model):
        assert block.self_attn.k_proj._basis.weight is basis.weight


def test_refusals(tiny_tokenizer, calib_file, tiny_model):
    model = tiny_model("llama-gqa")
    layout = layout_of(model.config)
    with pytest.raises(ValueError, match="group"):
        BasisShareConfig(ratio=0.3, group=0)
    with pytest.raises(ValueError, match="prune"):
        BasisShareConfig(ratio=0.3, prune=1.5)
    for bad in (0, 2.5, "6"):
        with pytest.raises(ValueError, match="ranks"):
            ChoiceShareConfig(ratio=0.3, ranks=bad)
    plan = _plan(model, tiny_tokenizer, calib_file)
    d = plan.to_dict()
    with pytest.raises(ValueError, match="rank"):
        SharePlan.from_dict({**d, "bases": [{"layers": [0], "rank": layout.hidden_size + 1}]}).validate(layout)
    with pytest.raises(ValueError, match="two bases"):
        SharePlan.from_dict({**d, "bases": [{"layers": [0, 1], "rank": 2}, {"layers": [1], "rank": 2}]}).validate(layout)
    with pytest.raises(ValueError, match="bases"):
        SharePlan.from_dict({**d, "bases": [{"layers": "0", "rank": 2}]})
    missing = SharePlan.from_dict(d, fitted={k: v for k, v in plan.fitted.items() if k != basis_key(0)})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="basis0"):
        headshare.share(model, missing)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_plan_written_before_bases_existed_still_loads(tiny_model):
    model = tiny_model("llama-gqa")
    d = headshare.make_plan(model, 0.3, "random").to_dict()
    d.pop("bases")
    d["version"] = 2
    old = SharePlan.from_dict(d)
    assert old.bases == [] and old.basis_layers() == {}
    old.validate(layout_of(model.config))


def test_a_layer_whose_units_are_all_pruned_can_sit_in_a_basis_group(tiny_tokenizer, calib_file, tiny_model):
    """Gemma 3 270M at 30 % pruned every query head of a layer; its group's basis then serves the others."""
    from headshare.methods import basis as basis_module

    model = tiny_model("llama-mqa")
    layout = layout_of(model.config)
    U = layout.units_per_layer
    real = basis_module.pruning_costs

    def layer0_free(model, d, layout, layer, *a, **k):  # make pruning all of layer 0 the cheapest choice
        costs = real(model, d, layout, layer, *a, **k)
        return {r: (0.0 if len(r) == U else c) for r, c in costs.items()} if layer == 0 else costs

    basis_module.pruning_costs = layer0_free
    try:
        plan = _plan(model, tiny_tokenizer, calib_file, ratio=0.5, prune=0.7, group=3)
    finally:
        basis_module.pruning_costs = real
    assert {(0, u) for u in range(U)} <= set(plan.pruned) and plan.bases
    headshare.share(model, plan)
    assert torch.isfinite(outputs(model, corpus_ids(tiny_tokenizer))).all()


# --- choiceshare: per group a rank or no basis, per layer the units to prune ---

@pytest.mark.parametrize("unit", ["kv", "query"])
@pytest.mark.parametrize("arch", ARCHS)
def test_heldout_choice_removes_at_least_the_budget_and_counts_every_parameter(arch, unit, tiny_tokenizer,
                                                                              calib_file, tiny_model):
    if arch == "gpt2" and unit != "kv":
        pytest.skip("fused qkv: no query units")
    model = tiny_model(arch)
    layout = layout_of(model.config, unit)
    plan = _plan(model, tiny_tokenizer, calib_file, unit=unit, config=ChoiceShareConfig)
    assert not any("kv" in b for b in plan.bases)
    assert plan.notes["select"] == "heldout" and plan.notes["ranks"] == [b["rank"] for b in plan.bases]
    budget = units_for_ratio(0.5, layout) * layout.unit_params()
    p0, b0 = unique_parameters(model)
    expect, _ = _expected_removed(model, plan, layout)
    headshare.share(model, plan)
    p1, b1 = unique_parameters(model)
    assert p0 - p1 == expect and b0 - b1 == 4 * expect
    assert expect >= budget
    assert torch.isfinite(outputs(model, corpus_ids(tiny_tokenizer))).all()


def test_heldout_choice_finds_a_planted_shared_basis_and_shares_it_at_no_cost(tiny_tokenizer, calib_file,
                                                                              tiny_model):
    """Every q/k/v row of every layer lies in one 4-dimensional subspace of the input: a rank-4 basis shared by
    all layers reproduces the model exactly, while pruning any unit costs. The held-out choice must put the
    whole budget on that basis and leave the outputs as they were."""
    model = tiny_model("llama-mha")
    layout = layout_of(model.config)
    torch.manual_seed(1)
    shared = torch.randn(4, layout.hidden_size)
    with torch.no_grad():
        for block in blocks(model):
            for p in layout.in_projections():
                w = block.get_submodule(p.path).weight
                w.copy_(torch.randn(w.shape[0], 4) @ shared / 2)
    ids = corpus_ids(tiny_tokenizer)
    ref = outputs(model, ids)
    plan = _plan(model, tiny_tokenizer, calib_file, group=3, config=ChoiceShareConfig)
    assert plan.pruned == [] and len(plan.bases) == 1 and plan.bases[0]["rank"] >= 4
    budget = units_for_ratio(0.5, layout) * layout.unit_params()
    p0, _ = unique_parameters(model)
    headshare.share(model, plan)
    assert p0 - unique_parameters(model)[0] >= budget
    assert torch.allclose(outputs(model, ids), ref, atol=1e-4, rtol=1e-4)
    # the fixed split prunes 2/3 of the budget's units whatever the weights hold: it cannot get there
    fixed = _plan(tiny_model("llama-mha"), tiny_tokenizer, calib_file, group=3)
    assert len(fixed.pruned) == round(2 / 3 * units_for_ratio(0.5, layout))


def test_choice_costs_of_many_query_heads_are_the_per_subset_solves(tiny_llama, tiny_tokenizer, calib_file,
                                                                      monkeypatch):
    """8 query heads a layer (more than `EXHAUSTIVE`): the greedy's nested subsets take the downdated errors
    (one factorisation per rank and fold, the ridge fixed per layer): every (layer, rank, subset) cost is the
    per-subset solve's at that ridge."""
    import functools

    import headshare.methods.basis.heldout as heldout

    model = tiny_llama(seed=3, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)
    seen = []
    real = heldout.choice_costs
    monkeypatch.setattr(heldout, "choice_costs", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    cfg = dict(unit="query", config=ChoiceShareConfig, group=3)
    _plan(model, tiny_tokenizer, calib_file, **cfg)
    monkeypatch.setattr(heldout, "EXHAUSTIVE", 100)  # every layer solves each subset on its own
    monkeypatch.setattr(heldout, "subset_errors", functools.partial(heldout.subset_errors, fixed_ridge=True))
    _plan(model, tiny_tokenizer, calib_file, **cfg)
    nested, each = seen
    assert list(nested) == list(each) and len({r for _, r in nested}) > 2
    for key, costs in each.items():
        assert len(costs) == 9 and list(nested[key]) == list(costs)  # none, then the greedy's 8 nested subsets
        scale = max(costs.values())
        for s, c in costs.items():
            assert nested[key][s] == pytest.approx(c, rel=1e-4, abs=1e-6 * scale), (key, sorted(s))


def test_choiceshare_weighs_as_many_ranks_a_group_as_asked(tiny_llama, tiny_tokenizer, calib_file, monkeypatch):
    """`ranks` sets the grid's size; the costs of leaving a layer dense do not depend on it."""
    import headshare.methods.basis.heldout as heldout

    model = tiny_llama(seed=3, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)
    seen = []
    real = heldout.choice_costs
    monkeypatch.setattr(heldout, "choice_costs", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    for steps in (12, 3):
        _plan(model, tiny_tokenizer, calib_file, unit="query", config=ChoiceShareConfig, group=3, ranks=steps)
    many, few = ({r for _, r in costs if r is not None} for costs in seen)
    assert 1 <= len(few) <= 3 < len(many)
    assert {k: v for k, v in seen[0].items() if k[1] is None} == {k: v for k, v in seen[1].items() if k[1] is None}


def test_allocate_spends_the_budget_where_the_error_is_least():
    """Two one-layer groups on hidden size 10, one unit of 50 parameters and 10 rows each: a rank-2 basis saves
    10 x 8 - 20 = 60 parameters. Layer 0 is cheap to put on a basis and dear to prune, layer 1 the reverse.
    (Savings are rounded down to 1/20,000 of the budget, so a budget met to the parameter may be missed.)"""
    options = {
        (0, None): {frozenset(): (0.0, 10), frozenset({0}): (5.0, 0)},
        (0, 2): {frozenset(): (0.1, 10), frozenset({0}): (5.1, 0)},
        (1, None): {frozenset(): (0.0, 10), frozenset({0}): (0.2, 0)},
        (1, 2): {frozenset(): (9.0, 10), frozenset({0}): (9.2, 0)},
    }
    groups = [[0], [1]]
    assert allocate(groups, options, 50, 50, 10) == (set(), {(0,): 2, (1,): None})
    assert allocate(groups, options, 100, 50, 10) == ({(1, 0)}, {(0,): 2, (1,): None})
    # 105: the basis on layer 0 and pruning layer 1 (110 removed); 111: only both bases reach it (120)
    assert allocate(groups, options, 105, 50, 10) == ({(1, 0)}, {(0,): 2, (1,): None})
    assert allocate(groups, options, 111, 50, 10) == (set(), {(0,): 2, (1,): 2})
    with pytest.raises(ValueError, match="no choice"):
        allocate(groups, options, 121, 50, 10)


def test_query_units_leave_key_value_rows_off_the_bases(tiny_tokenizer, calib_file, tiny_model):
    """With query-head units only q rows go on the bases; k and v stay as they were."""
    model = tiny_model("llama-gqa")
    layout = layout_of(model.config, "query")
    k0 = blocks(model)[0].self_attn.k_proj.weight.detach().clone()
    plan = _plan(model, tiny_tokenizer, calib_file, unit="query")
    assert plan.bases and not any("kv" in b for b in plan.bases) and plan.based_rows(layout) == "q"
    expect, _ = _expected_removed(model, plan, layout)
    p0, _ = unique_parameters(model)
    headshare.share(model, plan)
    assert p0 - unique_parameters(model)[0] == expect
    assert isinstance(blocks(model)[0].self_attn.k_proj, torch.nn.Linear)
    assert torch.equal(blocks(model)[0].self_attn.k_proj.weight, k0)


def test_key_value_rows_on_a_basis_need_query_units_and_query_fits_need_the_kv_weights(tiny_tokenizer, calib_file,
                                                                                       tiny_model):
    model = tiny_model("llama-gqa")
    plan = _plan(model, tiny_tokenizer, calib_file, unit="query")
    d = plan.to_dict()
    with pytest.raises(ValueError, match="bases"):
        SharePlan.from_dict({**d, "bases": [{**d["bases"][0], "kv": "yes"}]})
    d = {**d, "bases": [{**b, "kv": True} for b in d["bases"]]}  # a plan file with k/v rows on its bases
    kv_units = {**d, "layout": {**d["layout"], "unit_kind": "kv",
                                "units_per_layer": layout_of(model.config, "kv").units_per_layer}}
    with pytest.raises(ValueError, match="only query-head units"):
        SharePlan.from_dict({**kv_units, "pruned": []}).validate(layout_of(model.config, "kv"))
    # a query-unit fit read k/v (the attention it refitted through): a model whose k differs is refused, unchanged
    other = copy.deepcopy(model)
    with torch.no_grad():
        blocks(other)[1].self_attn.k_proj.weight.mul_(1.01)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="fingerprints differ"):
        headshare.share(other, plan)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
