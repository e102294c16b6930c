"""Attention-map similarity of every pair of query heads and of layers, with bounded memory."""

from __future__ import annotations

import torch

from ..arch import arch_spec, blocks, layout_of
from ..errors import HeadshareError


def _row_normalised(maps: torch.Tensor, keep: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(n, T, T) maps -> (n, entries): rows scaled to unit length, then only the `keep` entries (the
    causal lower triangle: the rest is zero) or all of them."""
    maps = maps / maps.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return maps[:, keep[0], keep[1]] if keep is not None else maps.flatten(1)


@torch.no_grad()
def attention_similarity(model, windows: torch.Tensor, progress: bool = True,
                         device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-map similarity of all query-head pairs and of all layer pairs over token windows.

    The maps come from the calibration pipeline (`calibration.walk`, one block at a time on `device`, one
    window per block call) with eager attention; each layer's row-normalised maps wait on the CPU for the
    Gram blocks against the later layers.

    Args:
        windows: (n, T) token ids.
    Returns:
        (heads (L*H, L*H), layer mean maps (L, L)) float64 matrices of the mean row cosine, averaged
        over windows.
    """
    from ..methods.calibration import walk

    layout = layout_of(model.config)
    L, H = layout.num_layers, layout.num_heads
    n, T = windows.shape
    if n == 0:
        raise HeadshareError("no calibration windows: the text is shorter than one window")
    apath = arch_spec(layout.model_type).attention
    gram_heads = torch.zeros(L * H, L * H, dtype=torch.float64)
    gram_layers = torch.zeros(L, L, dtype=torch.float64)
    heads: list[torch.Tensor] = []  # per layer: (n, H, entries) row-normalised maps
    means: list[torch.Tensor] = []  # per layer: (n, entries) of the head-mean map
    keep = None
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # sdpa/flash kernels never materialise the maps
    try:
        for layer, d in walk(model, windows, device, progress, desc="attention maps", batch_tokens=T):
            maps: list[torch.Tensor] = []
            attn = blocks(model)[layer].get_submodule(apath)
            handle = attn.register_forward_hook(lambda _m, _a, out, maps=maps: maps.append(out[1][0].float()))
            try:
                for args, kwargs in d.attn_calls:  # one window each
                    attn(*args, **kwargs)
            finally:
                handle.remove()
            if keep is None:
                tril = torch.tril_indices(T, T, device=maps[0].device)
                causal = not maps[0].triu(1).any()  # encoders (BERT) attend both ways
                keep = (tril[0], tril[1]) if causal else None
            heads.append(torch.stack([_row_normalised(m, keep) for m in maps]).cpu())
            means.append(torch.stack([_row_normalised(m.mean(0, keepdim=True), keep)[0] for m in maps]).cpu())
            rows = slice(layer * H, (layer + 1) * H)
            for other in range(layer + 1):
                cols = slice(other * H, (other + 1) * H)
                block = sum((heads[layer][w] @ heads[other][w].T).double() for w in range(n))
                gram_heads[rows, cols] = block
                gram_heads[cols, rows] = block.T
                s = sum(float(means[layer][w] @ means[other][w]) for w in range(n))
                gram_layers[layer, other] = gram_layers[other, layer] = s
    finally:
        model.set_attn_implementation(before)
    # each map contributes sum_t cos(A[t], B[t]); / T gives the mean row cosine, / n the window mean
    return gram_heads / (T * n), gram_layers / (T * n)

