"""`basisshare`: prune the cheapest units, express the rest of each group of layers' q/k/v through one shared
basis, refit what is left by least squares.

Two kinds of removal share one parameter budget, the same number of parameters that pruning
floor(ratio x units) units removes, so every row of a benchmark removes the same amount:

- A share `prune` of the budget goes to pruning whole units, chosen as `fitprune` chooses them (a knapsack
  over layers on the cross-fitted error left after refitting the o columns that stay).
- The rest goes to shared bases. The layers are cut into groups of `group` consecutive layers. In each
  group the input-side weights (q, k, v rows of the units that stay) of all its layers are stacked and
  factored through one (rank, hidden) basis, by an SVD whitened with the group's calibration inputs: the
  basis keeps what those inputs actually excite, not what the raw weights look like. One rank for every
  group, the largest the budget allows. The basis acts on the input side, before RoPE and any q/k norm,
  so it is compatible with rotary position embeddings by construction. The o projection is not shared.
- Then one pass through the layers in order, on the modified model's own inputs: each layer's
  coefficients on its basis are refitted by ridge least squares so that its q/k/v outputs match the
  original model's on the original inputs (so each layer absorbs what earlier layers changed), then its
  o columns are refitted as `fitshare` refits them.

Everything fitted (bases, coefficients, o columns) travels with the plan; `headshare.share` applies it.

    >>> plan = headshare.make_plan(model, BasisShareConfig(ratio=0.3), tokenizer=tok)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..arch import arch_spec, blocks, layout_of
from ..plan import new_plan, units_for_ratio
from ..sharing import own_index
from ..units import basis_key, coef_key, get_slices, read_fitted, set_slices, weights_fingerprint
from . import CalibConfig, check, is_integer, is_number, register_method
from .calibration import calibration_ids, capture, layer_gram, run_block
from .fitshare import RHO, _refit_hook
from .lstsq import heldout_share_costs, knapsack, layer_options

GROUP = 4  # layers per basis; SmolLM2 at 30 %, prune 2/3: 2 layers 17.97, 4 layers 17.88, 8 layers 18.01
PRUNE = 2 / 3  # share of the budget pruning takes; SmolLM2 at 30 %, 2 layers: 1/2 18.03, 2/3 17.97, 4/5 18.14
# ridge of the optional sequential coefficient refit, relative to the mean diagonal of its Gram matrix; off by
# default: on SmolLM2 at 30 % it made perplexity worse (19.05 against 17.92 without, BENCHMARKS.md)
COEF_RIDGE = None


@dataclass
class BasisShareConfig(CalibConfig):
    group: int = GROUP  # consecutive layers that share one basis
    prune: float = PRUNE  # share of the parameter budget spent on pruning whole units (the rest: bases)
    rho: float = RHO  # ridge of the o refit, as in fitprune
    coef_ridge: float | None = COEF_RIDGE  # ridge of the sequential coefficient refit (None: no refit)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "group", is_integer(self.group) and self.group >= 1, "an integer >= 1")
        check(self, "prune", is_number(self.prune) and 0 <= self.prune <= 1, "a number in [0, 1]")
        check(self, "rho", is_number(self.rho) and self.rho >= 0, "a number >= 0")
        check(self, "coef_ridge", self.coef_ridge is None or (is_number(self.coef_ridge) and self.coef_ridge >= 0),
              "a number >= 0 or none")


def _inputs(data) -> list[torch.Tensor]:
    """(N, hidden) float64 input of every layer's attention (after the block's norm)."""
    out = []
    for d in data:
        args, kwargs = d.attn_call
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out.append(x.reshape(-1, x.shape[-1]).double())
    return out


def _orient(w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A weight as (out, in), whatever its storage orientation (and back: the map is its own inverse)."""
    return w.T if conv1d else w


def _rank_for_budget(dense: list[tuple[int, int]], budget: int) -> int:
    """The largest rank r with sum over groups of (hidden x rows - r x (hidden + rows)) >= budget."""
    total = sum(h * n for h, n in dense)
    per_rank = sum(h + n for h, n in dense)
    return max(0, math.floor((total - budget) / per_rank))


@torch.no_grad()
def _whitened_basis(x: torch.Tensor, w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (rank, hidden), coefficients (rows, rank)) minimising ||x w^T - x basis^T coef^T||.

    With x^T x = S S^T, the error is ||S^T (w^T - basis^T coef^T)||: an SVD of S^T w^T, mapped back."""
    g = x.T @ x
    g = g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    s = torch.linalg.cholesky(g)
    u, sv, vh = torch.linalg.svd(s.T @ w.T, full_matrices=False)
    basis = torch.linalg.solve_triangular(s.T, u[:, :rank], upper=True).T  # (rank, hidden)
    return basis, (sv[:rank, None] * vh[:rank]).T


def _pruning_costs(model, data, layout, rho: float, n_seqs: int, progress: bool) -> list[dict]:
    """Per layer, {subset of units: cross-fitted error left after pruning it and refitting o} (fitprune's)."""
    from tqdm.auto import tqdm

    costs = []
    for layer in tqdm(range(layout.num_layers), desc="pruning costs", disable=not progress, unit="layer"):
        gram = layer_gram(model, data, layout, layer, [])
        options = layer_options(gram, layout.units_per_layer, [], rho, math.inf)
        costs.append(heldout_share_costs(gram, options, data[layer], layout, rho, n_seqs, math.inf))
    return costs


@register_method("basisshare", BasisShareConfig, "prune the cheapest units, put the q/k/v of each group of layers "
                                                 "on one shared whitened basis, refit coefficients and o columns "
                                                 "(calibration text; the fitted tensors travel with the plan)",
                 needs_tokenizer=True)
@torch.no_grad()
def basisshare(model, cfg: BasisShareConfig, tokenizer=None, progress: bool = False):
    """Pruning and shared bases under one budget (see the module docstring); the model is not changed."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    layout = layout_of(model.config)
    U, L = layout.units_per_layer, layout.num_layers
    n = units_for_ratio(cfg.ratio, layout)
    if n == 0:
        return new_plan(model, "basisshare", cfg.ratio)
    budget = n * layout.unit_params()
    ids = calibration_ids(model, tokenizer, cfg.calib, cfg.calib_tokens)
    base = weights_fingerprint(model)
    data = capture(model, ids)
    xs = _inputs(data)
    n_prune = round(cfg.prune * n)
    pruned: set = set()
    if n_prune:
        pruned = set(knapsack(_pruning_costs(model, data, layout, cfg.rho, len(ids), progress), n_prune))
    left = budget - len(pruned) * layout.unit_params()

    bl = blocks(model)
    ins = layout.in_projections()
    own = {layer: [u for u in range(U) if (layer, u) not in pruned] for layer in range(L)}
    rows = {(layer, p.path): own_index(p, own[layer]) for layer in range(L) for p in ins}
    weights = {(layer, p.path): _orient(bl[layer].get_submodule(p.path).weight, p.conv1d).double()[rows[(layer, p.path)]]
               for layer in range(L) for p in ins}
    groups = [list(range(s, min(L, s + cfg.group))) for s in range(0, L, cfg.group)]
    groups = [g for g in groups if any(own[layer] for layer in g)]
    rank = 0
    while left > 0 and groups:
        dense = [(layout.hidden_size, sum(len(rows[(layer, p.path)]) for layer in g for p in ins)) for g in groups]
        rank = _rank_for_budget(dense, left)
        # a group whose factors would not be smaller than its weights (few rows left after pruning) stays dense
        worth = [g for g, (h, m) in zip(groups, dense, strict=True) if rank * (h + m) < h * m]
        if len(worth) == len(groups):
            break
        groups, rank = worth, 0
    if left > 0 and rank == 0:
        raise ValueError(f"ratio {cfg.ratio} with prune={cfg.prune} leaves the bases a budget no rank >= 1 meets; "
                         "raise prune or lower the ratio")
    bases, coefs = [], {}
    for g in (tqdm(groups, desc="bases", disable=not progress, unit="group") if rank else []):
        keys = [(layer, p.path) for layer in g for p in ins]
        w = torch.cat([weights[k] for k in keys])  # (rows of the group, hidden)
        basis, c = _whitened_basis(torch.cat([xs[layer] for layer in g]), w, rank)
        bases.append((g, basis))
        start = 0
        for k in keys:
            coefs[k] = c[start:start + len(rows[k])]
            start += len(rows[k])
    in_basis = {layer: basis for g, basis in bases for layer in g}
    touched = {layer for layer, _ in pruned} | set(in_basis)
    t1 = time.perf_counter()

    # the sequential pass on the model as the plan will make it (dense weights standing in for basis x coef)
    saved = {(layer, u): get_slices(bl[layer], layout, u) for layer in touched for u in range(U)}
    apath = arch_spec(layout.model_type).attention
    try:
        for layer, u in pruned:
            zero = {k: (torch.zeros_like(w), b) for k, (w, b) in saved[(layer, u)].items()}
            set_slices(bl[layer], layout, u, zero)
        h = data[0].h
        for layer in tqdm(range(L), desc="refit", disable=not progress, unit="layer"):
            block, handles = bl[layer], []
            if layer in in_basis:
                _write_dense(block, ins, rows, coefs, in_basis[layer], layer)
                if cfg.coef_ridge is not None:
                    handles.append(block.get_submodule(apath).register_forward_pre_hook(
                        _coef_hook(block, ins, rows, coefs, weights, in_basis[layer], layer, xs[layer],
                                   cfg.coef_ridge), with_kwargs=True))
            if layer in touched:
                gone = [u for u in range(U) if (layer, u) in pruned]
                handles.append(block.get_submodule(layout.o_projection().path).register_forward_pre_hook(
                    _refit_hook(block, layout, layer, data[layer], gone, {}, bl, cfg.rho, {}, True)))
            try:
                h = run_block(block, data[layer].block_call, h)
            finally:
                for hd in handles:
                    hd.remove()
        kept = [(layer, u) for layer in touched for u in own[layer]]
        fitted = read_fitted(model, kept, [layout.o_projection().path])
    finally:
        for (layer, u), slices in saved.items():
            set_slices(bl[layer], layout, u, slices)
    dtype = bl[0].get_submodule(layout.o_projection().path).weight.dtype
    for i, (_, basis) in enumerate(bases):
        fitted[basis_key(i)] = basis.to(dtype).contiguous()
    conv1d = {p.path: p.conv1d for p in ins}
    for (layer, path), c in coefs.items():
        if len(c):
            fitted[coef_key(layer, path)] = _orient(c, conv1d[path]).to(dtype).contiguous()
    notes = {"fitted": "o columns of the units that stay in touched layers; bases and their coefficients",
             "rank": rank, "groups": len(bases), "units_pruned": len(pruned),
             "params_budget": budget, "params_by_bases": sum(h * m - rank * (h + m) for h, m in dense) if rank else 0,
             "select_seconds": round(t1 - t0, 1), "refit_seconds": round(time.perf_counter() - t1, 1)}
    return new_plan(model, "basisshare", cfg.ratio, pruned=sorted(pruned), notes=notes, fitted=fitted,
                    base_sha1=base, bases=[{"layers": g, "rank": rank} for g, _ in bases])


def _write_dense(block, ins, rows, coefs, basis, layer) -> None:
    """Write coef x basis into the kept rows of the layer's q/k/v (pruned rows stay zero)."""
    for p in ins:
        idx = rows[(layer, p.path)]
        if not len(idx):
            continue
        mod = block.get_submodule(p.path)
        w = _orient(mod.weight.data, p.conv1d)
        w[idx] = (coefs[(layer, p.path)] @ basis).to(w.dtype)


def _coef_hook(block, ins, rows, coefs, weights, basis, layer, x0, ridge):
    """A pre-hook on the attention module: refit the layer's coefficients on the input it now gets, so that
    its q/k/v outputs match the original layer's on the original input, and write them (dense) first."""

    def hook(_m, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        a = x.reshape(-1, x.shape[-1]).double() @ basis.T  # (N, rank)
        g = a.T @ a
        g = g + ridge * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
        chol = torch.linalg.cholesky(g)
        for p in ins:
            key = (layer, p.path)
            if not len(rows[key]):
                continue
            target = x0 @ weights[key].T  # (N, rows): the original outputs
            coefs[key] = torch.cholesky_solve(a.T @ target, chol).T
        _write_dense(block, ins, rows, coefs, basis, layer)
    return hook
