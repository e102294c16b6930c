"""`headshare.methods.baselines`: random, layerwise and prune at sharing's budget, exactly.

They remove the same unit budget as sharing, deterministically, with exact savings.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, bias_flags

import headshare
from headshare.arch import blocks, layout_of
from headshare.methods import METHODS
from headshare.methods.baselines import layer_similarity, output_energy
from headshare.plan import units_for_ratio
from headshare.units import unit_slices

BASELINES = ("random", "layerwise", "prune")


def test_registered_for_the_cli():
    from headshare.cli import build_parser

    assert set(BASELINES) <= set(METHODS)
    args = build_parser().parse_args(["plan", "m", "--method", "layerwise", "--ratio", "0.3", "--out", "p.json"])
    assert args.method == "layerwise"


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.6])
def test_unit_count_determinism_and_validity(method, ratio, tiny_llama, tiny_plan):
    # 5 layers x 2 units: 0.25 -> 2 units, 0.5 -> 5 (not a multiple of 2: layerwise ends with a partial layer)
    model = tiny_llama(num_hidden_layers=5)
    layout = layout_of(model.config)
    plan = tiny_plan(model, ratio, method)
    assert plan.units_removed == units_for_ratio(ratio, layout)
    assert plan.method == method
    plan.validate(layout)
    again = tiny_plan(model, ratio, method)
    assert again.to_dict() == plan.to_dict()
    if method == "prune":
        assert plan.assignments == [] and len(set(plan.pruned)) == len(plan.pruned)
    else:
        assert plan.pruned == [] and all(a.source_layer < a.layer for a in plan.assignments)


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mqa", "qwen2-bias", "gpt2"])
def test_parameters_removed_are_exactly_predicted(method, arch, tiny_model, tiny_plan):
    model = tiny_model(arch)
    layout = layout_of(model.config)
    plan = tiny_plan(model, 0.5, method)
    per_unit = layout.unit_params(bias_flags(model))
    p0, b0 = headshare.unique_parameters(model)
    headshare.share(model, plan)
    p1, b1 = headshare.unique_parameters(model)
    assert plan.units_removed == units_for_ratio(0.5, layout) > 0
    assert p0 - p1 == plan.units_removed * per_unit
    assert b0 - b1 == plan.units_removed * per_unit * 4


def test_random_depends_on_the_seed(tiny_llama):
    model = tiny_llama(num_hidden_layers=6)
    plans = [headshare.make_plan(model, 0.5, "random", seed=s).to_dict()["assignments"] for s in range(4)]
    assert len({str(p) for p in plans}) == 4
    assert headshare.make_plan(model, 0.5, "random", seed=2).to_dict()["assignments"] == plans[2]
    assert headshare.make_plan(model, headshare.RandomConfig(ratio=0.5, seed=2)).to_dict()["assignments"] == plans[2]
    # random sources: not always the previous layer's same unit
    pairs = {(a["layer"] - a["source_layer"], a["unit"] - a["source_unit"]) for p in plans for a in p}
    assert len(pairs) > 2


def test_layerwise_takes_whole_layers_from_the_most_similar_layer(tiny_llama):
    model = tiny_llama(num_hidden_layers=4)
    layout = layout_of(model.config)
    bl = blocks(model)
    with torch.no_grad():  # layer 3 becomes a noisy copy of layer 1: the best layer pair by far
        for path in ("self_attn.q_proj", "self_attn.k_proj"):
            w = bl[1].get_submodule(path).weight
            bl[3].get_submodule(path).weight.copy_(w + 0.001 * torch.randn_like(w))
    U = layout.units_per_layer
    plan = headshare.make_plan(model, U / layout.units_total, "layerwise")
    assert [(a.layer, a.unit, a.source_layer, a.source_unit) for a in plan.assignments] == \
        [(3, u, 1, u) for u in range(U)]
    assert plan.notes["partial_layer"] is None
    assert plan.notes["layer_scores"]["3"][0] == 1 and plan.notes["layer_scores"]["3"][1] > 0.99

    # one unit more than a whole layer: the next layer is taken partially, by its best aligned unit
    more = headshare.make_plan(model, (U + 1) / layout.units_total, "layerwise")
    assert more.units_removed == U + 1
    partial = more.notes["partial_layer"]
    assert partial is not None and partial != 3
    assert sum(a.layer == partial for a in more.assignments) == 1


def test_layer_similarity_is_the_mean_aligned_unit_cosine():
    L, U = 3, 2
    sim = torch.randn(L * U, L * U)
    got = layer_similarity(sim, L, U)
    for a in range(L):
        for b in range(L):
            want = sum(sim[a * U + u, b * U + u] for u in range(U)) / U
            assert got[a, b] == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("relative", [True, False])
def test_output_energy_matches_direct_computation(relative, tiny_llama, tiny_tokenizer, calib_file):
    model = tiny_llama(num_hidden_layers=3)
    layout = layout_of(model.config)
    energy = output_energy(model, tiny_tokenizer, calib_file, calib_tokens=64, block_size=32, relative=relative)
    # independently: capture each block's input and o_proj input, project each unit's slice through its columns
    o_in, h_in = {}, {}
    hooks = [b.self_attn.o_proj.register_forward_pre_hook(lambda _m, a, i=i: o_in.setdefault(i, []).append(a[0]))
             for i, b in enumerate(blocks(model))]
    hooks += [b.register_forward_pre_hook(lambda _m, a, k, i=i: h_in.setdefault(i, []).append(
        a[0] if a else k["hidden_states"]), with_kwargs=True) for i, b in enumerate(blocks(model))]
    from headshare.data import tokenize

    ids = tokenize(tiny_tokenizer, open(calib_file).read(), bos=False)[:64].view(2, 32)
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    d = layout.head_dim * layout.q_heads_per_unit
    for layer, block in enumerate(blocks(model)):
        x = torch.cat(o_in[layer], dim=1)[0]  # (tokens, heads*d)
        stream = torch.cat(h_in[layer], dim=1)[0].pow(2).sum(-1) if relative else torch.ones(len(x))
        w = block.self_attn.o_proj.weight
        for u in range(layout.units_per_layer):
            y = x[:, u * d:(u + 1) * d] @ w[:, u * d:(u + 1) * d].T
            want = ((y ** 2).sum(-1) / stream).mean().item()
            assert energy[layer, u].item() == pytest.approx(want, rel=1e-4)


def test_prune_removes_the_silent_unit_first(tiny_llama, tiny_plan):
    model = tiny_llama(num_hidden_layers=3)
    layout = layout_of(model.config)
    o = layout.projections()[-1]
    with torch.no_grad():  # unit 1 of layer 0 writes nothing to the residual stream
        blocks(model)[0].self_attn.o_proj.weight[:, o.unit_index(1)] = 0.0
    assert unit_slices(blocks(model)[0].self_attn.o_proj.weight, o, layout.units_per_layer)["o"][1].abs().sum() == 0
    plan = tiny_plan(model, 1 / layout.units_total, "prune")
    assert plan.pruned == [(0, 1)]  # layer 0 is a candidate too
    assert plan.notes["scores"][0][2] == 0.0


@pytest.mark.parametrize("arch", sorted(TINY))
def test_baselines_run_on_every_architecture(arch, tiny_model, tiny_plan):
    model = tiny_model(arch)
    for method in BASELINES:
        plan = tiny_plan(model, 0.3, method)
        plan.validate(layout_of(model.config))


def test_output_energy_is_a_function_of_the_weights_and_the_text(tiny_llama, tiny_tokenizer, calib_file):
    first = output_energy(tiny_llama(num_hidden_layers=2), tiny_tokenizer, calib_file, calib_tokens=64)
    again = output_energy(tiny_llama(num_hidden_layers=2), tiny_tokenizer, calib_file, calib_tokens=64)
    assert torch.equal(again, first)  # equal weights in other tensors, computed afresh
