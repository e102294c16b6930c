"""Writing a basis layer into the model: coefficients times basis as dense q/k/v rows, the sequential refit of
the o columns on the model as the plan will make it, and the tensors the plan carries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ...arch import blocks
from ...units import basis_key, coef_key, fitted_key, get_slices, set_slices
from ..calibration import model_dtype, walk
from ..refit import edited_z, fit_layer
from .bases import orient


def write_dense(block, ins, rows, coefs, basis, layer) -> None:
    """Write coef x basis into the kept rows of the layer's q/k/v (pruned rows stay zero)."""
    for p in ins:
        idx = rows[(layer, p.path)]
        if not len(idx):
            continue
        mod = block.get_submodule(p.path)
        w = orient(mod.weight.data, p.conv1d)
        w[idx.to(w.device)] = (coefs[(layer, p.path)].to(basis.device) @ basis).to(w.dtype)


@torch.no_grad()
def sequential_refit(model, ids, layout, ins, pruned: set, rows: dict, coefs: Mapping, in_basis: Mapping, rho: float,
                     device, progress: bool, ridges: tuple[float, ...] | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The sequential pass on the model as the plan will make it (dense coef x basis standing in for the bases,
    pruned units zero), each layer edited while it runs and restored after, the edited model's stream beside the
    original: the o columns of the units that stay in touched layers, refitted (`refit.fit_layer`, its ridge
    cross-fitted from `ridges`), by `fitted_key`, and {layer: the ridge used, None where no refit paid off}."""
    bl, U = blocks(model), layout.units_per_layer
    own = {layer: [u for u in range(U) if (layer, u) not in pruned] for layer in range(layout.num_layers)}
    touched = {layer for layer, _ in pruned} | set(in_basis)
    opath = layout.o_projection().path
    fitted: dict[str, torch.Tensor] = {}
    used: dict[int, float | None] = {}
    stored = model_dtype(model)  # blocks may compute in float32 during their turn (calibration.compute_dtype)
    h = None
    for layer, d in walk(model, ids, device, progress, desc="refit"):
        if layer > max(touched):
            break
        h = d.h if h is None else h
        block = bl[layer]
        if layer not in touched:
            h = d.run_block(block, h)
            continue
        saved = {u: get_slices(block, layout, u) for u in range(U)}
        try:
            for u in range(U):
                if (layer, u) in pruned:
                    set_slices(block, layout, u, {k: (torch.zeros_like(w), b) for k, (w, b) in saved[u].items()})
            if layer in in_basis:
                write_dense(block, ins, rows, coefs, in_basis[layer].to(d.x.device), layer)
            gone = [u for u in range(U) if (layer, u) in pruned]
            z = edited_z(block, layout, d, h)
            used[layer] = fit_layer(block, layout, layer, d, z, gone, {}, None, rho, {}, True, ridges)
            h = d.run_block(block, h)
            for u in own[layer]:
                fitted[fitted_key(layer, opath, u)] = get_slices(block, layout, u)[opath][0].to("cpu", stored).contiguous()
        finally:
            for u, slices in saved.items():
                set_slices(block, layout, u, slices)
    return fitted, used


def basis_tensors(model, layout, ins, bases: Sequence, coefs: Mapping) -> dict[str, torch.Tensor]:
    """The bases and their coefficients as a plan carries them: on the CPU, in the model's dtype, coefficients in
    the projection's storage orientation."""
    fitted: dict[str, torch.Tensor] = {}
    opath = layout.o_projection().path
    dtype = blocks(model)[0].get_submodule(opath).weight.dtype
    for i, (_, basis) in enumerate(bases):
        fitted[basis_key(i)] = basis.to("cpu", dtype).contiguous()
    conv1d = {p.path: p.conv1d for p in ins}
    for (layer, path), c in coefs.items():
        if len(c):
            fitted[coef_key(layer, path)] = orient(c, conv1d[path]).to("cpu", dtype).contiguous()
    return fitted
