"""Per-query-head weight vectors: what the report compares heads by when it looks at weights alone."""

from __future__ import annotations

import torch

from ..arch import blocks, layout_of
from ..similarity import metric_parts
from ..units import unit_slices


def head_weight_vectors(model, metric: str = "qk") -> torch.Tensor:
    """(L * H, dim) float32 weight vectors, one per query head, not normalised.

    A query head's vector is its W_q rows and/or the W_k / W_v rows of the key/value head it reads,
    flattened and concatenated in the order of `METRICS[metric]`.
    """
    layout = layout_of(model.config)
    parts = metric_parts(metric, layout)
    U, gq, d = layout.units_per_layer, layout.q_heads_per_unit, layout.head_dim
    H = layout.num_heads
    rows = []
    for block in blocks(model):
        pieces: dict[str, torch.Tensor] = {}
        for proj in layout.projections():
            if proj.role != "out":
                continue
            w = block.get_submodule(proj.path).weight.detach()
            for name, t in unit_slices(w, proj, U).items():
                if name == "q":  # (U, gq*d, D) -> (H, d, D): unit u holds query heads u*gq .. u*gq+gq-1
                    pieces[name] = t.reshape(U * gq, d, t.shape[-1])
                else:  # (U, d, D), one per key/value head -> repeated for each query head reading it
                    pieces[name] = t.repeat_interleave(gq, dim=0)
        rows.append(torch.cat([pieces[p].reshape(H, -1).float() for p in parts], dim=1))
    return torch.cat(rows)

