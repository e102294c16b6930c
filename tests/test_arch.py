"""`headshare.arch`: each family's attention layout, read from its config, in both unit kinds."""

from __future__ import annotations

import pytest

import headshare
from headshare.arch import UnsupportedModelError, layout_of


@pytest.mark.parametrize("arch, units, q_per_unit, kv_per_unit, head_dim", [
    ("llama-mha", 4, 1, 1, 8), ("llama-gqa", 2, 2, 1, 8), ("llama-mqa", 4, 1, 0, 8),
    ("qwen3-norm", 2, 2, 1, 16), ("gemma", 4, 1, 0, 16), ("gpt2", 4, 1, 1, 8), ("bert", 4, 1, 1, 8),
])
def test_layouts(arch, units, q_per_unit, kv_per_unit, head_dim, tiny_model):
    layout = layout_of(tiny_model(arch).config)
    assert (layout.units_per_layer, layout.q_heads_per_unit, layout.kv_heads_per_unit, layout.head_dim) == \
        (units, q_per_unit, kv_per_unit, head_dim)
    assert layout.num_layers == 3


def test_unit_params_count_every_slice(tiny_model):
    layout = layout_of(tiny_model("llama-gqa").config)  # d=8, 2 q heads per unit, hidden 32
    assert layout.unit_params() == 32 * (16 + 8 + 8 + 16)


def test_unsupported_family_names_the_supported_ones():
    from transformers import T5Config

    with pytest.raises(UnsupportedModelError, match="supported: .*llama"):
        layout_of(T5Config())


def test_smollm2_layout_has_270_query_units(smollm2_config):
    cfg = smollm2_config
    kv, q = layout_of(cfg), layout_of(cfg, "query")
    assert (kv.units_per_layer, kv.units_total, q.units_per_layer, q.units_total) == (3, 90, 9, 270)
    assert [p.path for p in q.projections()] == ["self_attn.q_proj", "self_attn.o_proj"]
    assert q.unit_params() == 2 * 64 * 576 and kv.unit_params() == 8 * 64 * 576
    assert [q.kv_group(u) for u in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [kv.kv_group(u) for u in range(3)] == [0, 1, 2]
    assert layout_of(cfg, "kv") == kv  # an unshared model's units are the default unless asked for


def test_bad_unit_kinds_are_refused(tiny_model):
    with pytest.raises(ValueError, match="unit must be one of kv, query"):
        layout_of(tiny_model("llama-gqa").config, "heads")
    with pytest.raises(UnsupportedModelError, match="separate q/k/v"):
        layout_of(tiny_model("gpt2").config, "query")
    with pytest.raises(ValueError, match="unit must be one of"):
        headshare.make_plan(tiny_model("llama-gqa"), 0.3, "random", unit="head")
