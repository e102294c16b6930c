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
  With query-head units (and on multi-query models) only q rows are unit rows: the layers' k and v, which no
  unit owns, stay dense.
- Then one pass through the layers in order, on the modified model's own inputs: each layer's o columns
  are refitted as `fitshare` refits them (so each layer absorbs what earlier layers changed).

Everything fitted (bases, coefficients, o columns) travels with the plan; `headshare.share` applies it.

`choiceshare` replaces the fixed split by a choice: for every group a rank from a grid, or
no basis, and for every layer the units to prune, so that the summed cross-fitted error is least for the budget.
The error of a (layer, subset, rank) is the layer's attention output error with the subset pruned, its q/k/v
on a basis of that rank fitted on one half of the calibration tokens, and the o columns that stay refitted on
the same half, measured on the other half and both ways round (`_choice_costs`); a dynamic programme over the
parameters removed picks the combination (`_allocate`). Bases are then refitted on the rows that stay, and the
sequential pass is the same. On SmolLM2 with query-head units it beats the fixed split at 10-30 %; on key/value
units, and on Gemma 3 270M at 30-50 %, it loses to it (BENCHMARKS.md): there the layer-local error overrates
what a basis costs the whole model against what pruning costs it.

    >>> plan = headshare.make_plan(model, BasisShareConfig(ratio=0.3), tokenizer=tok)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..arch import blocks, layout_of
from ..config import check, is_integer, is_number
from ..errors import HeadshareError
from ..plan import new_plan, units_for_ratio
from ..units import basis_key, coef_key, fitted_key, get_slices, own_index, set_slices, weights_fingerprint
from .base import CalibConfig, register_method
from .calibration import calibration_ids, layer_gram, model_dtype, walk
from .lstsq import candidate_subsets, half, heldout_prune_costs, knapsack
from .refit import RHO, refit_hook

GROUP = 4  # layers per basis; SmolLM2 at 30 %, prune 2/3: 2 layers 17.97, 4 layers 17.88, 8 layers 18.01
PRUNE = 2 / 3  # share of the budget pruning takes; SmolLM2 at 30 %, 2 layers: 1/2 18.03, 2/3 17.97, 4/5 18.14


@dataclass
class BasisShareConfig(CalibConfig):
    group: int = GROUP  # consecutive layers that share one basis
    prune: float = PRUNE  # share of the parameter budget spent on pruning whole units (the rest: bases)
    rho: float = RHO  # ridge of the o refit, as in fitprune

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "group", is_integer(self.group) and self.group >= 1, "an integer >= 1")
        check(self, "prune", is_number(self.prune) and 0 <= self.prune <= 1, "a number in [0, 1]")
        check(self, "rho", is_number(self.rho) and self.rho >= 0, "a number >= 0")


def _orient(w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A weight as (out, in), whatever its storage orientation (and back: the map is its own inverse)."""
    return w.T if conv1d else w


def _rank_for_budget(dense: list[tuple[int, int]], budget: int) -> int:
    """The largest rank r with sum over groups of (hidden x rows - r x (hidden + rows)) >= budget."""
    total = sum(h * n for h, n in dense)
    per_rank = sum(h + n for h, n in dense)
    return max(0, math.floor((total - budget) / per_rank))


@torch.no_grad()
def _whitened_basis(g: torch.Tensor, w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (rank, hidden), coefficients (rows, rank)) minimising ||x w^T - x basis^T coef^T|| for inputs x
    whose Gram x^T x is `g` (float64).

    With x^T x = S S^T, the error is ||S^T (w^T - basis^T coef^T)||: the leading left singular vectors U of
    A = S^T w^T, mapped back, and coef = A^T U. With more rows than the hidden size (every group but a tiny
    one) U comes from the eigenvectors of A A^T (hidden x hidden): on a 7B group of 20,000 rows 38 s against
    the SVD's 224 s, the same subspace."""
    g = g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    s = torch.linalg.cholesky(g)
    a = s.T @ w.T  # (hidden, rows)
    if a.shape[1] > a.shape[0]:
        u = torch.linalg.eigh(a @ a.T)[1].flip(1)[:, :rank]  # eigenvalues ascend: the last are the leading
    else:
        u = torch.linalg.svd(a, full_matrices=False)[0][:, :rank]
    basis = torch.linalg.solve_triangular(s.T, u, upper=True).T  # (rank, hidden)
    return basis, a.T @ u


def _pruning_costs(model, d, layout, layer: int, rho: float, n_seqs: int) -> dict:
    """{subset of the layer's units: cross-fitted error left after pruning it and refitting o} (fitprune's)."""
    gram = layer_gram(model, d, layout, layer, [])
    subsets = [frozenset(c) for c in candidate_subsets(gram, layout.units_per_layer, rho)]
    return heldout_prune_costs(gram, subsets, d, layout, rho, n_seqs)


def _groups(num_layers: int, size: int) -> list[list[int]]:
    """Consecutive layers in groups of `size` (the last one may be shorter)."""
    return [list(range(s, min(num_layers, s + size))) for s in range(0, num_layers, size)]


def _fixed_choice(layout, ins, cfg, n_prune: int, costs: list[dict], budget: int):
    """basisshare's fixed split: `prune` of the budget (`n_prune` units) to pruning units (fitprune's knapsack over the
    per-layer `costs`), the rest to one rank for every group that the budget allows. Returns (pruned units,
    [(group layers, rank)])."""
    U, L = layout.units_per_layer, layout.num_layers
    pruned: set = set(knapsack(costs, n_prune)) if n_prune else set()
    left = budget - len(pruned) * layout.unit_params()
    groups = _groups(L, cfg.group)
    groups = [g for g in groups if any((layer, u) not in pruned for layer in g for u in range(U))]
    rank = 0
    while left > 0 and groups:
        dense = [(layout.hidden_size, _group_rows(layout, ins, g, pruned)) for g in groups]
        rank = _rank_for_budget(dense, left)
        # a group whose factors would not be smaller than its weights (few rows left after pruning) stays dense
        worth = [g for g, (h, m) in zip(groups, dense, strict=True) if rank * (h + m) < h * m]
        if len(worth) == len(groups):
            break
        groups, rank = worth, 0
    if left > 0 and rank == 0:
        raise HeadshareError(f"ratio {cfg.ratio} with prune={cfg.prune} leaves the bases a budget no rank >= 1 meets; "
                         "raise prune or lower the ratio")
    return pruned, [(g, rank) for g in groups] if rank else []


def _heldout_choice(model, walk_again, layout, grams, ins, cfg, subsets: dict, split: int, budget: int):
    """choiceshare's held-out choice: per group of `group` layers a rank or no basis, per layer the units to prune (among
    `subsets`), for the least summed cross-fitted error (`_choice_costs`) that removes the budget (`_allocate`)."""
    groups = _groups(layout.num_layers, cfg.group)
    costs = _choice_costs(model, walk_again, layout, grams, groups, ins, subsets, cfg.rho, split)
    options = {}
    for (layer, r), by_subset in costs.items():
        options[(layer, r)] = {s: (c, _group_rows(layout, ins, [layer], {(layer, u) for u in s}))
                               for s, c in by_subset.items()}
    pruned, ranks = _allocate(groups, options, budget, layout.unit_params(), layout.hidden_size)
    chosen = [(g, ranks[tuple(g)]) for g in groups if ranks[tuple(g)] is not None]
    # the bases are refitted on the rows that stay: a group whose rows are all pruned has nothing to share
    chosen = [(g, r) for g, r in chosen if _group_rows(layout, ins, g, pruned)]
    return pruned, chosen


@register_method("basisshare", BasisShareConfig, "prune the cheapest units, put the q/k/v of each group of layers "
                                                 "on one shared whitened basis, refit coefficients and o columns "
                                                 "(calibration text; the fitted tensors travel with the plan)",
                 needs_tokenizer=True)
@torch.no_grad()
def basisshare(model, cfg: BasisShareConfig, tokenizer=None, progress: bool = False, device=None):
    """Pruning and shared bases under one budget (see the module docstring); the model is not changed."""
    return _plan(model, cfg, tokenizer, progress, "basisshare", False, device)


@dataclass
class ChoiceShareConfig(BasisShareConfig):
    """basisshare's options; `prune` is not read: the held-out choice decides what pruning takes."""


@register_method("choiceshare", ChoiceShareConfig, "basisshare with the split chosen by held-out error: per group "
                                                   "of layers a basis rank or none, per layer the units to prune "
                                                   "(calibration text; the fitted tensors travel with the plan)",
                 needs_tokenizer=True)
def choiceshare(model, cfg: ChoiceShareConfig, tokenizer=None, progress: bool = False, device=None):
    """basisshare with the held-out choice (see `_heldout_choice`); the model is not changed."""
    return _plan(model, cfg, tokenizer, progress, "choiceshare", True, device)


@torch.no_grad()
def _plan(model, cfg: BasisShareConfig, tokenizer, progress: bool, name: str, heldout: bool, device=None):
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    layout = layout_of(model.config, cfg.unit)
    U, L = layout.units_per_layer, layout.num_layers
    n = units_for_ratio(cfg.ratio, layout)
    if n == 0:
        return new_plan(model, name, cfg.ratio, unit_kind=cfg.unit)
    budget = n * layout.unit_params()
    ids = calibration_ids(model, tokenizer, cfg.calib, cfg.calib_tokens)
    base = weights_fingerprint(model, cfg.unit)
    bl = blocks(model)
    ins = layout.in_projections()  # what the bases carry
    n_prune = 0 if heldout else round(cfg.prune * n)
    groups = _groups(L, cfg.group)
    group_of = {layer: i for i, g in enumerate(groups) for layer in g}
    tokens = ids.numel()
    split = half(tokens, len(ids))
    folds = (slice(0, split), slice(split, tokens))

    # one walk: every group's attention-input Grams per fold (the bases' whitening), and per layer what the
    # choice needs (heldout: the subsets worth weighing; fixed: the pruning costs)
    grams: list[list[torch.Tensor]] = [[0.0, 0.0] for _ in groups]
    subsets, prune_costs = {}, []
    t_choice = time.perf_counter()
    for layer, d in walk(model, ids, device, progress, desc="inputs"):
        x = d.x.double()
        for f, part in enumerate(folds):
            grams[group_of[layer]][f] = grams[group_of[layer]][f] + x[part].T @ x[part]
        if heldout:
            cands = candidate_subsets(layer_gram(model, d, layout, layer, []), U, cfg.rho)
            subsets[layer] = [frozenset(), *(frozenset(c) for c in cands)]
        elif n_prune:
            prune_costs.append(_pruning_costs(model, d, layout, layer, cfg.rho, len(ids)))
    if heldout:
        again = lambda: walk(model, ids, device, progress, desc="choice costs")  # noqa: E731
        pruned, chosen = _heldout_choice(model, again, layout, grams, ins, cfg, subsets, split, budget)
    else:
        pruned, chosen = _fixed_choice(layout, ins, cfg, n_prune, prune_costs, budget)
    t_choice = time.perf_counter() - t_choice

    own = {layer: [u for u in range(U) if (layer, u) not in pruned] for layer in range(L)}
    rows = {(layer, p.path): _own_rows(layout, p, layer, pruned) for layer in range(L) for p in ins}
    bases, coefs = [], {}
    for g, r in tqdm(chosen, desc="bases", disable=not progress, unit="group"):
        keys = [(layer, p.path) for layer in g for p in ins]
        gram = grams[group_of[g[0]]][0] + grams[group_of[g[0]]][1]
        w = torch.cat([_weight(bl, k, ins).to(gram.device)[rows[k].to(gram.device)] for k in keys])  # (rows, hidden)
        basis, c = _whitened_basis(gram, w, r)
        bases.append((g, basis))
        start = 0
        for k in keys:
            coefs[k] = c[start:start + len(rows[k])]
            start += len(rows[k])
    del grams
    in_basis = {layer: basis for g, basis in bases for layer in g}
    touched = {layer for layer, _ in pruned} | set(in_basis)
    t1 = time.perf_counter()

    # the sequential pass on the model as the plan will make it (dense weights standing in for basis x coef),
    # each layer edited while it runs and restored after; the edited model's stream runs beside the original
    opath = layout.o_projection().path
    fitted: dict[str, torch.Tensor] = {}
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
        handles = []
        try:
            for u in range(U):
                if (layer, u) in pruned:
                    set_slices(block, layout, u, {k: (torch.zeros_like(w), b) for k, (w, b) in saved[u].items()})
            if layer in in_basis:
                _write_dense(block, ins, rows, coefs, in_basis[layer].to(d.x.device), layer)
            gone = [u for u in range(U) if (layer, u) in pruned]
            handles.append(block.get_submodule(opath).register_forward_pre_hook(
                refit_hook(block, layout, layer, d, gone, {}, None, cfg.rho, {}, True)))
            h = d.run_block(block, h)
            for u in own[layer]:
                fitted[fitted_key(layer, opath, u)] = get_slices(block, layout, u)[opath][0].to("cpu", stored).contiguous()
        finally:
            for hd in handles:
                hd.remove()
            for u, slices in saved.items():
                set_slices(block, layout, u, slices)
    dtype = bl[0].get_submodule(opath).weight.dtype
    for i, (_, basis) in enumerate(bases):
        fitted[basis_key(i)] = basis.to("cpu", dtype).contiguous()
    conv1d = {p.path: p.conv1d for p in ins}
    for (layer, path), c in coefs.items():
        if len(c):
            fitted[coef_key(layer, path)] = _orient(c, conv1d[path]).to("cpu", dtype).contiguous()
    h = layout.hidden_size
    by_bases = sum(h * m - r * (h + m) for m, r in ((sum(len(rows[(la, p.path)]) for la in g for p in ins), r)
                                                     for g, r in chosen))
    if len(pruned) * layout.unit_params() + by_bases < budget:  # the accounting above is exact; this cannot be
        raise AssertionError(f"basisshare removed {len(pruned) * layout.unit_params() + by_bases} < {budget}")
    notes = {"fitted": "o columns of the units that stay in touched layers; bases and their coefficients",
             "select": "heldout" if heldout else "fixed", "rank": max((r for _, r in chosen), default=0),
             "ranks": [r for _, r in chosen], "groups": len(bases), "units_pruned": len(pruned),
             "params_budget": budget, "params_by_bases": by_bases,
             "choice_seconds": round(t_choice, 1),
             "select_seconds": round(t1 - t0, 1), "refit_seconds": round(time.perf_counter() - t1, 1)}
    return new_plan(model, name, cfg.ratio, unit_kind=cfg.unit, pruned=sorted(pruned), notes=notes, fitted=fitted,
                    base_sha1=base, bases=[{"layers": g, "rank": r} for g, r in chosen])


def _weight(bl, key: tuple[int, str], ins) -> torch.Tensor:
    """(rows, hidden) float64: a layer's projection weight in (out, in) orientation."""
    layer, path = key
    conv1d = next(p.conv1d for p in ins if p.path == path)
    return _orient(bl[layer].get_submodule(path).weight, conv1d).double()


def _write_dense(block, ins, rows, coefs, basis, layer) -> None:
    """Write coef x basis into the kept rows of the layer's q/k/v (pruned rows stay zero)."""
    for p in ins:
        idx = rows[(layer, p.path)]
        if not len(idx):
            continue
        mod = block.get_submodule(p.path)
        w = _orient(mod.weight.data, p.conv1d)
        w[idx.to(w.device)] = (coefs[(layer, p.path)].to(basis.device) @ basis).to(w.dtype)


# --- choiceshare: per group, a rank or no basis; per layer, the units to prune; by cross-fitted error ---

RANKS = 12  # rank candidates per group: RANKS steps up to the rank at which the factors stop being smaller
BINS = 20_000  # resolution of the parameter budget in the allocation (item savings rounded down, so never short)


def _rank_grid(h: int, m: int) -> list[int]:
    """Ranks worth weighing for a group of m rows on hidden size h: below h m / (h + m) (factors smaller)."""
    top = (h * m) // (h + m)
    step = max(1, top // RANKS)
    return sorted({step * k for k in range(1, RANKS + 1) if 1 <= step * k < top})


def _fold_stats(z: torch.Tensor, a: torch.Tensor, w: torch.Tensor, part: slice) -> tuple:
    """(Z'WZ, Z'Wa, a'Wa) of one fold of the tokens (Grams in float32, kept in float64)."""
    zf, af, wf = z[part].float(), a[part].float(), w[part].float()
    zw = zf * wf
    return (zf.T @ zw).double(), (zw.T @ af).double(), float((af.double() ** 2 * w[part]).sum())


def _subset_errors(fits: tuple, evals: tuple, wo: torch.Tensor, cols: list[torch.Tensor], subsets: list,
                   rho: float, n: int) -> dict:
    """{subset: error per token} when `subset` is pruned and the other units' o columns (`wo`, (D, in)) are
    refitted on one fold and the error measured on the other, both ways round (`fits[i]`, `evals[i]`: fold
    statistics of direction i). The ridge is on the change of the columns, as in `heldout_share_costs`."""
    out = {}
    for s in subsets:
        keep = [cols[u] for u in range(len(cols)) if u not in s]
        err = 0.0
        for (ga, ca, _), (gb, cb, aab) in zip(fits, evals, strict=True):
            if not keep:
                err += aab
                continue
            k = torch.cat(keep)
            m = wo[:, k].T  # (kept features, D): the columns as they are
            gk = ga[k][:, k]
            lam = rho * gk.diagonal().mean().clamp_min(1e-30)
            chol = torch.linalg.cholesky(gk + lam * torch.eye(len(k), dtype=gk.dtype))
            x = m + torch.cholesky_solve(ca[k] - gk @ m, chol)
            err += aab - 2 * float((x * cb[k]).sum()) + float((x * (gb[k][:, k] @ x)).sum())
        out[s] = max(err, 0.0) / n
    return out


@torch.no_grad()
def _choice_costs(model, walk_again, layout, grams, groups, ins, subsets, rho: float, split: int) -> dict:
    """{(layer, rank or None): {subset: cross-fitted error per token}}: the layer's attention output error
    when `subset` is pruned, its q/k/v rows are put on its group's whitened basis of that rank (None: left
    dense) and the o columns that stay are refitted. The basis is fitted on one fold of the tokens (all rows of
    the group, whatever is pruned later; `grams[group][fold]` are the fold's input Grams), the o refit on the
    same fold, the error measured on the other. One walk of the calibration pipeline (`walk_again()`); a
    group's fold bases exist only while its layers are walked."""
    bl = blocks(model)
    op = layout.o_projection()
    U = layout.units_per_layer
    cols = [op.unit_index(u) for u in range(U)]
    group_of = {layer: i for i, g in enumerate(groups) for layer in g}
    costs = {}
    factors, ranks, full = None, None, None
    for layer, d in walk_again():
        n = d.z.shape[0]
        folds = (slice(0, split), slice(split, n))
        g = groups[group_of[layer]]
        dev = d.z.device
        if layer == g[0]:  # the group's fold bases, from the weights of all its layers
            full = {la: {p.path: _weight(bl, (la, p.path), ins).to(dev) for p in ins} for la in g}
            w = torch.cat([full[la][p.path] for la in g for p in ins])
            ranks = _rank_grid(layout.hidden_size, w.shape[0])
            factors = [_whitened_basis(grams[group_of[layer]][f].to(dev), w, max(ranks)) for f in (0, 1)]
            del w
        block = bl[layer]
        wo = _orient(block.get_submodule(op.path).weight, op.conv1d).double()  # (D, in)
        a = d.z.double() @ wo.T  # the attention output without the o bias: what the refit must match
        dense = [_fold_stats(d.z, a, d.w, f) for f in folds]
        costs[(layer, None)] = _subset_errors((dense[0], dense[1]), (dense[1], dense[0]), wo, cols,
                                              subsets[layer], rho, n)
        saved = {p.path: block.get_submodule(p.path).weight.data.clone() for p in ins}
        first = sum(len(full[la][p.path]) for la in g if la < layer for p in ins)  # the layer's rows in w
        try:
            for r in ranks:
                fits, evals = [], []
                for f, (basis, coef) in enumerate(factors):
                    start = first
                    for p in ins:
                        rows = len(full[layer][p.path])
                        dense_w = coef[start:start + rows, :r] @ basis[:r]
                        block.get_submodule(p.path).weight.data.copy_(_orient(dense_w, p.conv1d))
                        start += rows
                    z = d.attention_z(block, layout)
                    fits.append(_fold_stats(z, a, d.w, folds[f]))
                    evals.append(_fold_stats(z, a, d.w, folds[1 - f]))
                costs[(layer, r)] = _subset_errors(tuple(fits), tuple(evals), wo, cols, subsets[layer], rho, n)
        finally:
            for p in ins:
                block.get_submodule(p.path).weight.data.copy_(saved[p.path])
        if layer == g[-1]:
            factors, full = None, None
    return costs


def _own_rows(layout, p, layer: int, pruned) -> torch.Tensor:
    """The rows of projection `p` in `layer` that stay when `pruned` goes."""
    return own_index(p, [u for u in range(layout.units_per_layer) if (layer, u) not in pruned])


def _group_rows(layout, ins, g: list[int], pruned=frozenset()) -> int:
    """Input-side rows (of the projections `ins`) of a group's layers that stay when `pruned` ((layer, unit)
    pairs) goes."""
    return sum(len(_own_rows(layout, p, layer, pruned)) for layer in g for p in ins)


def _allocate(groups, options: dict, budget: int, unit_params: int, h: int) -> tuple[set, dict]:
    """The least summed cost that removes at least `budget` parameters: per group a rank or None (dense), per
    layer a subset to prune. `options[(layer, rank)]` is {subset: (cost, kept input rows)}. A group at rank r
    costs r x h for its basis and saves (h - r) per kept row; a pruned unit saves `unit_params`. Dynamic
    programming over the parameters removed, in BINS steps of the budget, savings rounded down and basis
    costs up, so the plan it returns never removes less than the budget."""
    import numpy as np

    q = budget / BINS
    inf = math.inf
    arr = np.full(BINS + 1, inf)
    arr[0] = 0.0
    trace = []
    for g in groups:
        ranks = sorted({r for (layer, r) in options if layer == g[0] and r is not None})
        best, best_r = np.full(BINS + 1, inf), np.full(BINS + 1, -1)
        per_rank = []
        for ri, r in enumerate([None, *ranks]):
            ov = 0 if r is None else math.ceil(r * h / q)
            cap = BINS + ov
            cur = np.full(cap + 1, inf)
            cur[:BINS + 1] = arr
            steps = []
            for layer in g:
                items = list(options[(layer, r)].items())
                new, ch, prev = np.full(cap + 1, inf), np.zeros(cap + 1, np.int32), np.zeros(cap + 1, np.int64)
                for j, (s, (c, rows)) in enumerate(items):
                    saves = len(s) * unit_params + (0 if r is None else rows * (h - r))
                    sb = min(int(saves // q), cap)
                    tgt, src = np.full(cap + 1, inf), np.arange(cap + 1)
                    tgt[sb:cap] = cur[:cap - sb] + c
                    src[sb:cap] = np.arange(cap - sb)
                    tail = int(np.argmin(cur[cap - sb:]))
                    tgt[cap], src[cap] = cur[cap - sb + tail] + c, cap - sb + tail
                    better = tgt < new
                    new[better], ch[better], prev[better] = tgt[better], j, src[better]
                steps.append((items, ch, prev))
                cur = new
            per_rank.append((r, ov, steps))
            net = cur[ov:]
            better = net < best
            best[better], best_r[better] = net[better], ri
        trace.append((best_r, per_rank))
        arr = best
    if not math.isfinite(arr[BINS]):
        raise HeadshareError(f"no choice of pruning and bases removes {budget} parameters")
    pruned, ranks_of = set(), {}
    t = BINS
    for g, (best_r, per_rank) in zip(reversed(groups), reversed(trace), strict=True):
        r, ov, steps = per_rank[best_r[t]]
        i = t + ov
        for layer, (items, ch, prev) in zip(reversed(g), reversed(steps), strict=True):
            pruned |= {(layer, u) for u in items[ch[i]][0]}
            i = prev[i]
        ranks_of[tuple(g)] = r
        t = i
    return pruned, ranks_of
