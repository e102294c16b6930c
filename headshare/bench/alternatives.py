"""Whole-model alternatives to head sharing at the same parameters, measured by the bench beside it.

Head sharing only touches attention, a small part of most models (30 % of SmolLM2's attention is 5.9 % of the
model). A user who wants the model smaller by that many parameters can also take them elsewhere:

- `mlpprune`: remove the same number of MLP channels from every block (a channel is one row of gate_proj and
  up_proj and one column of down_proj), those whose output energy on the calibration text is least;
- `mlpprune+refit`: the same channels, then down_proj's kept columns refitted by least squares to give the
  block's full MLP output, regularised toward the original columns with the strength that gives the least
  error on the other half of the calibration tokens (two folds); a layer whose refit does not lower that
  held-out error keeps its original columns;
- `layerdrop`: remove whole blocks, those that change their input least on the calibration text (block
  influence, 1 - the mean cosine between a block's input and output per token: ShortGPT), as many as come
  nearest to the budget (at least one).

Each edits a copy of the model in place and really removes the parameters (narrower projections, fewer blocks,
the config updated), so the checkpoint it saves reloads with transformers. The budget is what the attention
ratio removes: `ratio` of the key/value units' parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import arch_spec, blocks, layout_of
from ..errors import HeadshareError
from ..methods.calibration import walk
from ..methods.lstsq import crossfit_errors, ridge_from_moments
from ..plan import units_for_ratio

ALTERNATIVES = ("mlpprune", "mlpprune+refit", "layerdrop")
# ridge strengths tried for the down_proj refit, relative to the mean diagonal of the kept channels' Gram
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def is_alternative(method: str) -> bool:
    return method in ALTERNATIVES


def budget(model: nn.Module, ratio: float) -> int:
    """Parameters that `ratio` of the model's key/value units hold: what every row at `ratio` may remove."""
    layout = layout_of(model.config, "kv")
    return units_for_ratio(ratio, layout) * layout.unit_params()


def remove_whole(model: nn.Module, method: str, ratio: float, ids: torch.Tensor, device=None) -> dict:
    """Apply the alternative `method` at the budget of `ratio` to `model` in place, calibrated on `ids`;
    returns what it removed (for the row's notes)."""
    if method not in ALTERNATIVES:
        raise HeadshareError(f"unknown whole-model alternative {method!r}; known: {', '.join(ALTERNATIVES)}")
    params = budget(model, ratio)
    if method == "layerdrop":
        return drop_layers(model, ids, params, device)
    return prune_mlp(model, ids, params, refit=method.endswith("+refit"), device=device)


def _mlp_paths(model: nn.Module) -> tuple[tuple[str, ...], str]:
    spec = arch_spec(model.config.model_type)
    if not spec.mlp_in or spec.mlp_out is None:
        raise HeadshareError(f"MLP channel pruning needs gated MLP projections (gate/up/down); "
                             f"{model.config.model_type!r} has none")
    return spec.mlp_in, spec.mlp_out


def _refit(W: torch.Tensor, folds: list[torch.Tensor], keep: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
    """The refitted columns (None: keep the original ones) and the held-out errors that chose them.

    The kept columns change by D to make up for the dropped channels' output W_d a_d, ridge toward no change:
    per fold, from its Gram G, the moments (G_kk, W_d G_dk, tr(W_d G_dd W_d')) that `lstsq.crossfit_errors`
    weighs each ridge on (one Cholesky each; the products are dropped-channels wide, not the whole MLP's)."""
    drop = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    drop[keep] = False
    wd = W[:, drop]
    moments = []
    for G in folds:
        gd = G[drop]
        moments.append((G[keep][:, keep], (wd @ gd[:, keep]).T, float(((wd @ gd[:, drop]) * wd).sum())))
    tried = crossfit_errors(moments, RIDGES)
    rho = min(RIDGES, key=tried.get)
    info = {"held_out_unfitted": tried[None], "held_out_refit": tried[rho], "ridge": rho}
    if tried[rho] >= tried[None]:
        return None, info
    both = ridge_from_moments(moments[0][0] + moments[1][0], moments[0][1] + moments[1][1], rho)
    return W[:, keep] + both.T, info


def _narrow(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only the features `index` of its outputs (dim 0) or inputs (dim 1)."""
    w = linear.weight.data.index_select(dim, index.to(linear.weight.device))
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data if dim == 1 else linear.bias.data[index.to(linear.bias.device)])
    return out


def prune_mlp(model: nn.Module, ids: torch.Tensor, params: int, refit: bool = False, device=None) -> dict:
    """Remove the same number of MLP channels from every block, nearest to `params` parameters in all."""
    ins, out_path = _mlp_paths(model)
    bl = blocks(model)
    width = model.config.hidden_size
    inner = bl[0].get_submodule(out_path).in_features
    per_channel = (len(ins) + 1) * width
    m = round(params / (per_channel * len(bl)))
    if not 0 < m < inner:
        raise HeadshareError(f"{params:,} parameters are {m} MLP channels a block of {inner}: nothing to prune "
                             "or everything")
    edits, refits = [], []
    for layer, d in walk(model, ids, device, desc="mlp channels"):
        block = bl[layer]
        down = block.get_submodule(out_path)
        folds = [torch.zeros(inner, inner, dtype=torch.float64, device=d.h.device) for _ in range(2)]
        half, seen = d.h.shape[0] // 2 or 1, [0]  # the first half of the sequences are fold 0

        def gram(_m, args, folds=folds, half=half, seen=seen):
            for x in args[0].double():  # one sequence at a time, in order, whatever the micro-batches
                x = x.reshape(-1, inner)
                folds[0 if seen[0] < half else 1].add_(x.T @ x)
                seen[0] += 1

        hook = down.register_forward_pre_hook(gram)
        try:
            with torch.no_grad():
                d.run_block(block, d.h)
        finally:
            hook.remove()
        G = folds[0] + folds[1]
        W = down.weight.detach().double()
        score = G.diagonal() * W.pow(2).sum(0)  # output energy of each channel alone
        keep = score.argsort(descending=True)[: inner - m].sort().values
        new_down = None
        if refit:
            new_down, info = _refit(W, folds, keep)
            refits.append({"layer": layer, **info, "applied": new_down is not None})
        edits.append((keep.cpu(), None if new_down is None else new_down.cpu()))
    for block, (keep, new_down) in zip(bl, edits, strict=True):
        for path in ins:
            _set(block, path, _narrow(block.get_submodule(path), keep, 0))
        down = _narrow(block.get_submodule(out_path), keep, 1)
        if new_down is not None:
            down.weight.data.copy_(new_down.to(down.weight.dtype))
        _set(block, out_path, down)
    model.config.intermediate_size = inner - m
    return {"channels_removed_per_block": m, "intermediate_size": inner - m,
            **({"refits": refits} if refit else {})}


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (dotted, relative to `root`) in place of what is there."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def drop_layers(model: nn.Module, ids: torch.Tensor, params: int, device=None) -> dict:
    """Remove the blocks of least influence, as many as come nearest to `params` parameters (at least one)."""
    bl = blocks(model)
    per_block = sum(p.numel() for p in bl[0].parameters())
    n = max(1, round(params / per_block))
    if n >= len(bl):
        raise HeadshareError(f"{params:,} parameters are {n} of the model's {len(bl)} blocks")
    influence = []
    for _, d in walk(model, ids, device, desc="block influence"):
        x, y = d.h.double().flatten(0, 1), d.out.double().flatten(0, 1)
        influence.append(float(1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()))
    drop = sorted(sorted(range(len(bl)), key=influence.__getitem__)[:n])
    keep = [i for i in range(len(bl)) if i not in drop]
    kept = nn.ModuleList([bl[i] for i in keep])
    for new, block in enumerate(kept):  # the KV cache indexes layers by position
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    _set(model.base_model, arch_spec(model.config.model_type).layers, kept)
    model.config.num_hidden_layers = len(keep)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return {"layers_dropped": drop, "influence": [round(v, 6) for v in influence]}
