"""The sequential refit of o columns: layer by layer on the model as a plan will make it, the o columns of the
units that stay are refitted by ridge least squares so that the layer's attention output stays what it was,
and borrowed units get a fitted scale. `fitshare`, `fitprune` and the basis methods refit this way."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import blocks, layout_of
from ..units import fitted_key, get_slices, o_columns, parse_fitted_key, set_o_columns, set_slices, unit_z
from .calibration import model_dtype, walk
from .lstsq import (
    RidgeResidual,
    crossfit_moments,
    crossfit_ridge,
    fit_scales,
    half,
    heldout_lenders,
    refit_moments,
    ridge_from_moments,
)

RHO = 1.0  # ridge, relative to the mean diagonal of the Gram matrix: best held-out error (1e-2 overfitted)
# the ridges a refit chooses from per layer by cross-fitting (`crossfit=True`; no refit at all is the last
# choice). A fixed stronger ridge helped SmolLM2 off the calibration text (fitprune at 30 %, news: rho 1 55.2,
# 10 50.7, 100 45.7) but cross-fitting on docstrings, or on docstrings+news, did not find it (BENCHMARKS.md)
RIDGES = (0.1, 1.0, 10.0, 100.0, 1000.0)


@torch.no_grad()
def refit(model: nn.Module, ids: torch.Tensor, removed: set, borrow: dict, rho: float = RHO,
          progress: bool = False, heldout: bool = True, device=None, unit: str = "kv",
          ridges: tuple[float, ...] | None = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """The sequential refit: in every layer with removed units, the o columns of the units that stay are
    refitted so that the layer's attention output matches the original model's, and borrowed units get a
    fitted scale. Layers run in order on the model as the plan will make it (a second stream beside the
    original one that `walk` carries), so each refit also absorbs what earlier layers changed. Borrowed
    units read their root's weights as `share` will: q/k/v as stored, o columns as refitted if the root's
    layer was refitted first.

    Each layer is edited only while it runs and restored right after. Returns ({(layer, unit): scale} for
    the units that borrow, the refitted o columns as `units.read_fitted` names them, on the CPU, {layer: the
    ridge its refit used, None where none was applied}): a candidate whose borrowing does not lower the
    cross-fitted error is pruned instead, and the ridge is cross-fitted from `ridges` (`fit_layer`).
    `removed` and `borrow` name units of the kind `unit`.
    """
    layout = layout_of(model.config, unit)
    U = layout.units_per_layer
    bl = blocks(model)
    o = layout.o_projection()
    layers = {lay for lay, _ in removed}
    scales: dict = {}
    fitted: dict[str, torch.Tensor] = {}
    used: dict[int, float | None] = {}
    stored = model_dtype(model)  # blocks may compute in float32 during their turn (calibration.compute_dtype)

    def source(sl: int, su: int) -> dict:
        """A root's slices as `share` will read them: its o columns as refitted, if they were."""
        slices = get_slices(bl[sl], layout, su)
        key = fitted_key(sl, o.path, su)
        if key in fitted:
            slices[o.path] = (fitted[key], slices[o.path][1])
        return slices

    if not layers:
        return scales, fitted, used
    h = None
    for layer, d in walk(model, ids, device, progress, desc="refit"):
        if layer > max(layers):
            break
        if layer < min(layers):
            continue
        h = d.h if h is None else h
        block = bl[layer]
        gone = [u for u in range(U) if (layer, u) in removed]
        if not gone:
            h = d.run_block(block, h)
            continue
        saved = {u: get_slices(block, layout, u) for u in range(U)}
        try:
            for u in gone:
                if (layer, u) in borrow:
                    set_slices(block, layout, u, source(*borrow[(layer, u)]))
            z = edited_z(block, layout, d, h)
            used[layer] = fit_layer(block, layout, layer, d, z, gone, borrow, source, rho, scales, heldout, ridges)
            h = d.run_block(block, h)
            for u in range(U):
                if u not in gone:
                    fitted[fitted_key(layer, o.path, u)] = get_slices(block, layout, u)[o.path][0].to("cpu", stored).contiguous()
        finally:
            for u, slices in saved.items():
                set_slices(block, layout, u, slices)
    return scales, dict(sorted(fitted.items(), key=lambda kv: parse_fitted_key(kv[0]))), used


def edited_z(block, layout, data, h: torch.Tensor) -> torch.Tensor:
    """(N, in) the o projection's input when `block`, as it is now, runs on the edited stream `h`: every
    micro-batch's, so that a fit sees all the calibration tokens at once (the block's output is dropped)."""
    got: list[torch.Tensor] = []
    handle = block.get_submodule(layout.o_projection().path).register_forward_pre_hook(
        lambda _m, args: got.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        data.run_block(block, h)
    finally:
        handle.remove()
    return torch.cat(got)


def fit_layer(block, layout, layer, data, z, gone, borrow, source, rho, scales, heldout=True,
              ridges: tuple[float, ...] | None = None) -> float | None:
    """Fit one layer's o columns on the heads' outputs `z` (N, in) of the edited stream and write them into
    `block`: the kept units' columns refitted toward the layer's original attention output, borrowed units
    scaled, the other removed units zeroed. `source(layer, unit)` gives a root's slices as `share` will read
    them. The two cross-fitting folds are the halves of the calibration sequences.

    With `ridges`, the ridge is chosen per layer from them by cross-fitting (fit on one half of the sequences,
    measured on the other, both ways round), and not refitting at all is one of the choices: the refit is
    applied only where it lowers the held-out error. With a calibration mix of two sources the halves are the
    two sources, so the strength is chosen across kinds of text. Without `ridges` (or with `heldout` off) the
    ridge is `rho`. Returns the ridge used (None: the kept columns were left as they were)."""
    U = layout.units_per_layer
    opath = layout.o_projection().path
    kept = [u for u in range(U) if u not in gone]
    if not any((layer, u) in borrow for u in gone):
        return _fit_kept(block, layout, data, z, kept, gone, rho, heldout, ridges)
    target, w = data.a.double(), data.w
    bias = block.get_submodule(opath).bias
    if bias is not None:  # a per-layer constant that no unit owns: not part of the fit
        target = target - bias.detach().double()
    zs = {u: unit_z(z, layout, u) for u in range(U)}
    wk = {u: o_columns(block, layout, u) for u in kept}
    v = target - sum((zs[u] @ wk[u].T for u in kept), torch.zeros_like(target))
    kz = torch.cat([zs[u] for u in kept], 1) if kept else None
    lent = [u for u in gone if (layer, u) in borrow]
    roots = {u: _columns(source(*borrow[(layer, u)])[opath][0], layout).to(z.device) for u in lent}
    ys = {u: zs[u] @ roots[u].T for u in lent}
    split = half(z.shape[0], data.h.shape[0])
    if heldout and ridges:
        rho, lent = crossfit_ridge(kz, v, w, ys, split, ridges)
    elif heldout:
        # a candidate borrows only if that lowers the cross-fitted error: an in-sample gain of a few
        # scalars is not enough (on SmolLM2 in-sample sharing made held-out perplexity worse than pruning)
        lent = heldout_lenders(kz, v, w, ys, rho, split)
    fit = RidgeResidual(kz if rho is not None else None, w, rho if rho is not None else 1.0)
    ys = [ys[u] for u in lent]
    a = fit_scales(fit, v, ys)
    for u, y, s in zip(lent, ys, a.tolist(), strict=True):
        v = v - s * y
        scales[(layer, u)] = s
        set_o_columns(block, layout, u, roots[u] * s)
    if kept and rho is not None:
        d = fit.solve(v)
        width = d.shape[0] // len(kept)
        for i, u in enumerate(kept):
            set_o_columns(block, layout, u, wk[u] + d[i * width:(i + 1) * width].T)
    for u in gone:
        if u not in lent:
            set_o_columns(block, layout, u, torch.zeros_like(o_columns(block, layout, u)))
    return rho


def _fit_kept(block, layout, data, z, kept, gone, rho, heldout, ridges) -> float | None:
    """`fit_layer` for a layer whose removed units are all pruned (no borrower): the same fits and choices
    from the folds' sufficient statistics (`lstsq.refit_moments`), summed a chunk of tokens at a time, so
    that no (tokens, hidden) float64 array is made whatever the calibration size."""
    o = layout.o_projection()
    if not heldout:
        ridges = None
    if kept:
        idx = torch.cat([o.unit_index(u) for u in kept]).to(z.device)
        wk = torch.cat([o_columns(block, layout, u) for u in kept], 1)
        bias = block.get_submodule(o.path).bias  # a per-layer constant that no unit owns: not part of the fit
        bias = bias.detach().double() if bias is not None else None
        split = half(z.shape[0], data.h.shape[0])
        folds = [refit_moments(z, idx, data.a, wk, data.w, part, bias)
                 for part in (slice(0, split), slice(split, z.shape[0]))]
        if ridges:
            rho = crossfit_moments(folds, ridges)
        if rho is not None:
            g, c = folds[0][0] + folds[1][0], folds[0][1] + folds[1][1]
            d = ridge_from_moments(g, c, rho)
            width = d.shape[0] // len(kept)
            for i, u in enumerate(kept):
                set_o_columns(block, layout, u, wk[:, i * width:(i + 1) * width] + d[i * width:(i + 1) * width].T)
    elif ridges:
        rho = None  # nothing to refit: cross-fitting has only "no refit" to choose
    for u in gone:
        set_o_columns(block, layout, u, torch.zeros_like(o_columns(block, layout, u)))
    return rho


def ridges_note(used: dict) -> dict:
    """{layer: ridge or "none"} for a plan's notes: what each refitted layer's cross-fitting chose."""
    return {str(layer): ("none" if r is None else r) for layer, r in sorted(used.items())}


def _columns(w: torch.Tensor, layout) -> torch.Tensor:
    """A unit's o slice in storage orientation as (hidden, width) float64, like `units.o_columns`."""
    return (w.t() if layout.o_projection().conv1d else w).double()
