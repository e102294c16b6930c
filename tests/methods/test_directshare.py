"""`headshare.methods.directshare`: directshare's planted duplicates, alignshare's similarity.

directshare finds a planted duplicate (of a unit, of a query head) and sharing it is free;
alignshare's similarity sees through the exact symmetries of attention.
"""

from __future__ import annotations

import pytest
import torch
from conftest import IDS, copy_in, duplicate_unit, outputs

import headshare
from headshare.arch import blocks, layout_of
from headshare.methods.directshare import aligned_similarity
from headshare.plan import Assignment, new_plan


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "qwen3-norm"])
def test_planted_duplicate_is_found_shared_and_free(arch, tiny_model):
    model = tiny_model(arch)
    layout = layout_of(model.config)
    # make unit 1 of the last layer an exact copy of unit 0 of layer 0
    last = layout.num_layers - 1
    copy_in(model, new_plan(model, "manual", 0.0, assignments=[Assignment(last, 1, 0, 0)]))
    before = outputs(model, IDS)
    ratio = 1 / layout.units_total + 1e-9  # exactly one unit
    plan = headshare.make_plan(model, ratio)
    assert [(a.layer, a.unit, a.source_layer, a.source_unit) for a in plan.assignments] == [(last, 1, 0, 0)]
    assert plan.assignments[0].score == pytest.approx(1.0, abs=1e-6)
    headshare.share(model, plan)
    torch.testing.assert_close(outputs(model, IDS), before, rtol=1e-6, atol=1e-6)


def test_planted_duplicate_query_head_is_found_and_shared_at_no_cost(tiny_model):
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


def test_aligned_similarity_sees_through_the_exact_symmetries(tiny_model):
    import math

    from headshare.similarity import similarity_matrix

    model = tiny_model("llama-gqa")  # head_dim 8, 2 query heads per unit
    layout = layout_of(model.config)
    d, g, bl = layout.head_dim, layout.q_heads_per_unit, blocks(model)
    duplicate_unit(model, (1, 0), (0, 1))
    ids = torch.randint(0, 99, (1, 24), generator=torch.Generator().manual_seed(0))
    before = outputs(model, ids)
    # RoPE-pair rotations and q/k scalings, an invertible V/O map, a swap of the unit's query heads
    gen = torch.Generator().manual_seed(1)
    a = bl[1].self_attn
    with torch.no_grad():
        q = a.q_proj.weight[: g * d].view(g, d, -1).clone()
        k, v = a.k_proj.weight[:d].clone(), a.v_proj.weight[:d].clone()
        o = a.o_proj.weight[:, : g * d].view(-1, g, d).clone()
        for i in range(d // 2):
            th, c = 6.28 * float(torch.rand(1, generator=gen)), 0.5 + float(torch.rand(1, generator=gen))
            rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
            pair = [i, i + d // 2]
            q[:, pair] = c * torch.einsum("pq,hqx->hpx", rot, q[:, pair])
            k[pair] = rot @ k[pair] / c
        b = torch.randn(d, d, generator=gen) + 3 * torch.eye(d)
        v, o = b @ v, torch.einsum("xhd,de->xhe", o, torch.linalg.inv(b))
        q, o = q.flip(0), o.flip(1)
        a.q_proj.weight[: g * d], a.k_proj.weight[:d], a.v_proj.weight[:d] = q.reshape(g * d, -1), k, v
        a.o_proj.weight[:, : g * d] = o.reshape(o.shape[0], -1)
    torch.testing.assert_close(outputs(model, ids), before, atol=1e-5, rtol=1e-5)  # the same function
    pair = (1 * layout.units_per_layer + 0, 0 * layout.units_per_layer + 1)
    assert aligned_similarity(model)[pair] == pytest.approx(1.0, abs=1e-4)
    assert abs(float(similarity_matrix(model, "qk")[pair])) < 0.5  # the paper's cosine no longer sees it
