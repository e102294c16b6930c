"""units: reading a model's weights per unit and per query head."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "llama-mqa", "qwen2-bias", "gemma", "gpt2", "bert"])
def test_head_slices_cut_every_projection_per_query_head(name, tiny_model):
    """Against the weights read straight from the modules: query head h's q rows and o columns, and the rows of
    the key/value head it reads; fused (GPT-2, Conv1D) and separate projections alike."""
    from headshare.arch import arch_spec, blocks, layout_of
    from headshare.units import head_slices

    model = tiny_model(name)
    layout = layout_of(model.config)
    spec, d, H, KV = arch_spec(layout.model_type), layout.head_dim, layout.num_heads, layout.num_kv_heads
    block = blocks(model)[1]

    def linear(path):  # (out, in) whatever the module stores
        w = block.get_submodule(path).weight.detach()
        return w.t() if spec.conv1d else w

    if spec.qkv is not None:
        q, k, v = linear(spec.qkv).split(H * d)
    else:
        q, k, v = linear(spec.q), linear(spec.k), linear(spec.v)
    o = linear(spec.o)
    got = head_slices(block, layout)
    for h in range(H):
        g = h * KV // H
        assert torch.equal(got["q"][h], q[h * d:(h + 1) * d])
        assert torch.equal(got["k"][h], k[g * d:(g + 1) * d]) and torch.equal(got["v"][h], v[g * d:(g + 1) * d])
        assert torch.equal(got["o"][h], o[:, h * d:(h + 1) * d])
