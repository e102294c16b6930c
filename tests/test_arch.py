"""Reading the attention layout of each family from its config."""

from __future__ import annotations

import pytest
from archs import tiny_model

from headshare.arch import UnsupportedModelError, layout_of


@pytest.mark.parametrize("arch, units, q_per_unit, kv_per_unit, head_dim", [
    ("llama-mha", 4, 1, 1, 8), ("llama-gqa", 2, 2, 1, 8), ("llama-mqa", 4, 1, 0, 8),
    ("qwen3-norm", 2, 2, 1, 16), ("gemma", 4, 1, 0, 16), ("gpt2", 4, 1, 1, 8), ("bert", 4, 1, 1, 8),
])
def test_layouts(arch, units, q_per_unit, kv_per_unit, head_dim):
    layout = layout_of(tiny_model(arch).config)
    assert (layout.units_per_layer, layout.q_heads_per_unit, layout.kv_heads_per_unit, layout.head_dim) == \
        (units, q_per_unit, kv_per_unit, head_dim)
    assert layout.num_layers == 3


def test_unit_params_count_every_slice():
    layout = layout_of(tiny_model("llama-gqa").config)  # d=8, 2 q heads per unit, hidden 32
    assert layout.unit_params() == 32 * (16 + 8 + 8 + 16)


def test_unsupported_family_names_the_supported_ones():
    from transformers import T5Config

    with pytest.raises(UnsupportedModelError, match="supported: .*llama"):
        layout_of(T5Config())
