"""`headshare.similarity`: blocked, streamed similarity equals the plain pair-by-pair computation."""

from __future__ import annotations

import math

import pytest
import torch

from headshare.arch import blocks, layout_of
from headshare.similarity import METRICS, analysis, best_earlier_matches, similarity_matrix


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Plain float64 cosine of two tensors: the pair-by-pair reference the blocked path is checked against."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(a @ b / math.sqrt(float(a @ a) * float(b @ b)))


def _naive(model, metric):
    """Pair by pair, slicing each head out of the module weights by hand (the authors' way)."""
    layout = layout_of(model.config)
    U, d, g = layout.units_per_layer, layout.head_dim, layout.q_heads_per_unit
    attn = [b.self_attn for b in blocks(model)]

    def vec(layer, u):
        a = attn[layer]
        parts = {"q": a.q_proj.weight[u * g * d:(u + 1) * g * d], "k": a.k_proj.weight[u * d:(u + 1) * d],
                 "v": a.v_proj.weight[u * d:(u + 1) * d]}
        return torch.cat([parts[p].flatten() for p in METRICS[metric]])

    units = [(layer, u) for layer in range(layout.num_layers) for u in range(U)]
    return torch.tensor([[cosine(vec(*a), vec(*b)) for b in units] for a in units], dtype=torch.float64)


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("arch", ["llama-mha", "llama-gqa"])
def test_blocked_equals_naive(arch, metric, tiny_model):
    model = tiny_model(arch)
    fast = similarity_matrix(model, metric, progress=False)
    torch.testing.assert_close(fast.double(), _naive(model, metric), atol=1e-5, rtol=0)


def test_streamed_from_checkpoint_in_small_blocks_equals_in_memory(tmp_path, tiny_model):
    model = tiny_model("qwen3-norm")
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    in_memory = similarity_matrix(model, "qkv", progress=False)
    layout = layout_of(model.config)
    one_layer = layout.units_per_layer * (layout.q_heads_per_unit + 2) * layout.head_dim * layout.hidden_size * 4
    streamed = similarity_matrix(str(tmp_path), "qkv", block_bytes=one_layer, progress=False)
    torch.testing.assert_close(streamed, in_memory, atol=1e-6, rtol=0)


def test_gpt2_fused_qkv_matches_manual_slices(tiny_model):
    model = tiny_model("gpt2")
    sim = similarity_matrix(model, "qk", progress=False)
    w = [b.attn.c_attn.weight for b in model.transformer.h]  # (in, 3*out), Conv1D layout
    D, d = 32, 8

    def vec(layer, h):
        return torch.cat([w[layer][:, h * d:(h + 1) * d].T.flatten(), w[layer][:, D + h * d:D + (h + 1) * d].T.flatten()])

    assert sim[1 * 4 + 2, 0 * 4 + 3].item() == pytest.approx(cosine(vec(1, 2), vec(0, 3)), abs=1e-6)


def test_best_earlier_matches_only_look_back_and_break_ties_by_position(tiny_model):
    model = tiny_model("llama-gqa")
    layout = layout_of(model.config)
    sim = torch.zeros(layout.units_total, layout.units_total)  # every pair ties
    best = list(best_earlier_matches(sim, layout))
    assert len(best) == (layout.num_layers - 1) * layout.units_per_layer
    assert all((src_l, src_u) == (0, 0) for _, _, src_l, src_u, _ in best)


def test_unknown_metric_is_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown match function"):
        similarity_matrix(tiny_model("llama-gqa"), "qq", progress=False)


def test_multi_query_uses_query_rows_only(tiny_model):
    model = tiny_model("llama-mqa")
    qk = similarity_matrix(model, "qk", progress=False)
    q = similarity_matrix(model, "q", progress=False)
    assert torch.equal(qk, q)
    with pytest.raises(ValueError, match="multi-query"):
        similarity_matrix(model, "v", progress=False)


def test_analysis_lists_every_borrower(tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path)
    res = analysis(str(tmp_path), progress=False)
    assert len(res["best_matches"]) == 4 and len(res["matrix"]) == 6
    assert all(m["source_layer"] < m["layer"] for m in res["best_matches"])
