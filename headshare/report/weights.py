"""Per-query-head weight vectors: what the report compares heads by when it looks at weights alone."""

from __future__ import annotations

import torch

from ..arch import blocks, layout_of
from ..similarity import metric_parts
from ..units import head_slices


def head_weight_vectors(model, metric: str = "qk") -> torch.Tensor:
    """(L * H, dim) float32 weight vectors, one per query head, not normalised.

    A query head's vector is its W_q rows and/or the W_k / W_v rows of the key/value head it reads,
    flattened and concatenated in the order of `METRICS[metric]`.
    """
    layout = layout_of(model.config)
    parts = metric_parts(metric, layout)
    H = layout.num_heads
    rows = []
    for block in blocks(model):
        heads = head_slices(block, layout)
        rows.append(torch.cat([heads[p].reshape(H, -1).float() for p in parts], dim=1))
    return torch.cat(rows)
