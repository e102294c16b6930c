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
  With query-head units (and on multi-query models) only q rows are unit rows; `basis_kv=True` puts the
  layers' k and v on the bases too. Off by default: it was measured worse (BENCHMARKS.md).
- Then one pass through the layers in order, on the modified model's own inputs: each layer's
  coefficients on its basis are refitted by ridge least squares so that its q/k/v outputs match the
  original model's on the original inputs (so each layer absorbs what earlier layers changed), then its
  o columns are refitted as `fitshare` refits them.

Everything fitted (bases, coefficients, o columns) travels with the plan; `headshare.share` applies it.

`choiceshare` (`select="heldout"`) replaces the fixed split by a choice: for every group a rank from a grid, or
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

from ..arch import arch_spec, blocks, layout_of
from ..plan import new_plan, units_for_ratio
from ..sharing import own_index
from ..units import basis_key, coef_key, get_slices, read_fitted, set_slices, weights_fingerprint
from . import CalibConfig, check, is_integer, is_number, register_method
from .calibration import calibration_ids, capture, layer_gram, run_block
from .fitshare import RHO, _refit_hook
from .lstsq import candidate_subsets, half, heldout_share_costs, knapsack, layer_options

GROUP = 4  # layers per basis; SmolLM2 at 30 %, prune 2/3: 2 layers 17.97, 4 layers 17.88, 8 layers 18.01
PRUNE = 2 / 3  # share of the budget pruning takes; SmolLM2 at 30 %, 2 layers: 1/2 18.03, 2/3 17.97, 4/5 18.14
# ridge of the optional sequential coefficient refit, relative to the mean diagonal of its Gram matrix; off by
# default: on SmolLM2 at 30 % it made perplexity worse (19.05 against 17.92 without, BENCHMARKS.md)
COEF_RIDGE = None
SELECTS = ("fixed", "heldout")  # fixed: `prune` of the budget to pruning, one rank; heldout: chosen per group


@dataclass
class BasisShareConfig(CalibConfig):
    group: int = GROUP  # consecutive layers that share one basis
    prune: float = PRUNE  # share of the parameter budget spent on pruning whole units (the rest: bases)
    rho: float = RHO  # ridge of the o refit, as in fitprune
    coef_ridge: float | None = COEF_RIDGE  # ridge of the sequential coefficient refit (None: no refit)
    # "fixed": `prune` of the budget to pruning, the rest to one rank for every group; "heldout": per group a
    # rank or no basis, per layer the units to prune, least cross-fitted error for the budget (`prune` unused)
    select: str = "fixed"
    # with query-head units (and multi-query models), put the layers' k/v, which no unit owns, on the bases too;
    # off by default: on SmolLM2 at 30 % it made choiceshare@query 18.65 against 16.72 without (BENCHMARKS.md)
    basis_kv: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "group", is_integer(self.group) and self.group >= 1, "an integer >= 1")
        check(self, "prune", is_number(self.prune) and 0 <= self.prune <= 1, "a number in [0, 1]")
        check(self, "rho", is_number(self.rho) and self.rho >= 0, "a number >= 0")
        check(self, "coef_ridge", self.coef_ridge is None or (is_number(self.coef_ridge) and self.coef_ridge >= 0),
              "a number >= 0 or none")
        check(self, "select", self.select in SELECTS, f"one of {', '.join(SELECTS)}")
        check(self, "basis_kv", isinstance(self.basis_kv, bool), "true or false")


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


def _groups(num_layers: int, size: int) -> list[list[int]]:
    """Consecutive layers in groups of `size` (the last one may be shorter)."""
    return [list(range(s, min(num_layers, s + size))) for s in range(0, num_layers, size)]


def _fixed_choice(model, data, layout, ins, cfg, n: int, n_seqs: int, budget: int, progress: bool):
    """select="fixed": `prune` of the budget to pruning units (fitprune's knapsack), the rest to one rank for
    every group that the budget allows. Returns (pruned units, [(group layers, rank)])."""
    U, L = layout.units_per_layer, layout.num_layers
    n_prune = round(cfg.prune * n)
    pruned: set = set()
    if n_prune:
        pruned = set(knapsack(_pruning_costs(model, data, layout, cfg.rho, n_seqs, progress), n_prune))
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
        raise ValueError(f"ratio {cfg.ratio} with prune={cfg.prune} leaves the bases a budget no rank >= 1 meets; "
                         "raise prune or lower the ratio")
    return pruned, [(g, rank) for g in groups] if rank else []


def _heldout_choice(model, data, layout, xs, ins, cfg, n_seqs: int, budget: int, progress: bool):
    """select="heldout": per group of `group` layers a rank or no basis, per layer the units to prune, for the
    least summed cross-fitted error (`_choice_costs`) that removes the budget (`_allocate`)."""
    U, L = layout.units_per_layer, layout.num_layers
    groups = _groups(L, cfg.group)
    subsets = {}
    for layer in range(L):
        cands = candidate_subsets(layer_gram(model, data, layout, layer, []), U, cfg.rho)
        subsets[layer] = [frozenset(), *(frozenset(c) for c in cands)]
    split = half(xs[0].shape[0], n_seqs)
    costs = _choice_costs(model, data, layout, xs, groups, ins, subsets, cfg.rho, split, progress)
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
def basisshare(model, cfg: BasisShareConfig, tokenizer=None, progress: bool = False):
    """Pruning and shared bases under one budget (see the module docstring); the model is not changed."""
    return _plan(model, cfg, tokenizer, progress, "basisshare")


@dataclass
class ChoiceShareConfig(BasisShareConfig):
    select: str = "heldout"  # basisshare's options; only the default of `select` differs


@register_method("choiceshare", ChoiceShareConfig, "basisshare with the split chosen by held-out error: per group "
                                                   "of layers a basis rank or none, per layer the units to prune "
                                                   "(calibration text; the fitted tensors travel with the plan)",
                 needs_tokenizer=True)
def choiceshare(model, cfg: ChoiceShareConfig, tokenizer=None, progress: bool = False):
    """basisshare with `select="heldout"` (see `_heldout_choice`); the model is not changed."""
    return _plan(model, cfg, tokenizer, progress, "choiceshare")


@torch.no_grad()
def _plan(model, cfg: BasisShareConfig, tokenizer, progress: bool, name: str):
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    layout = layout_of(model.config)
    U, L = layout.units_per_layer, layout.num_layers
    n = units_for_ratio(cfg.ratio, layout)
    if n == 0:
        return new_plan(model, name, cfg.ratio)
    budget = n * layout.unit_params()
    ids = calibration_ids(model, tokenizer, cfg.calib, cfg.calib_tokens)
    base = weights_fingerprint(model)
    data = capture(model, ids)
    xs = _inputs(data)
    bl = blocks(model)
    whole = layout.layer_projections() if cfg.basis_kv else []
    ins = layout.in_projections() + whole  # what the bases carry
    t_choice = time.perf_counter()
    if cfg.select == "heldout":
        pruned, chosen = _heldout_choice(model, data, layout, xs, ins, cfg, len(ids), budget, progress)
    else:
        pruned, chosen = _fixed_choice(model, data, layout, ins, cfg, n, len(ids), budget, progress)
    t_choice = time.perf_counter() - t_choice

    own = {layer: [u for u in range(U) if (layer, u) not in pruned] for layer in range(L)}
    rows = {(layer, p.path): _own_rows(layout, p, layer, pruned) for layer in range(L) for p in ins}
    weights = {(layer, p.path): _orient(bl[layer].get_submodule(p.path).weight, p.conv1d).double()[rows[(layer, p.path)]]
               for layer in range(L) for p in ins}
    bases, coefs = [], {}
    for g, r in tqdm(chosen, desc="bases", disable=not progress, unit="group"):
        keys = [(layer, p.path) for layer in g for p in ins]
        w = torch.cat([weights[k] for k in keys])  # (rows of the group, hidden)
        basis, c = _whitened_basis(torch.cat([xs[layer] for layer in g]), w, r)
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
    saved_whole = {(layer, p.path): bl[layer].get_submodule(p.path).weight.data.clone()
                   for layer in in_basis for p in whole}  # no unit owns them: get_slices does not see them
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
        for (layer, path), w in saved_whole.items():
            bl[layer].get_submodule(path).weight.data.copy_(w)
    dtype = bl[0].get_submodule(layout.o_projection().path).weight.dtype
    for i, (_, basis) in enumerate(bases):
        fitted[basis_key(i)] = basis.to(dtype).contiguous()
    conv1d = {p.path: p.conv1d for p in ins}
    for (layer, path), c in coefs.items():
        if len(c):
            fitted[coef_key(layer, path)] = _orient(c, conv1d[path]).to(dtype).contiguous()
    h = layout.hidden_size
    by_bases = sum(h * m - r * (h + m) for m, r in ((sum(len(rows[(la, p.path)]) for la in g for p in ins), r)
                                                     for g, r in chosen))
    if len(pruned) * layout.unit_params() + by_bases < budget:  # the accounting above is exact; this cannot be
        raise AssertionError(f"basisshare removed {len(pruned) * layout.unit_params() + by_bases} < {budget}")
    notes = {"fitted": "o columns of the units that stay in touched layers; bases and their coefficients",
             "select": cfg.select, "rank": max((r for _, r in chosen), default=0),
             "ranks": [r for _, r in chosen], "groups": len(bases), "units_pruned": len(pruned),
             "params_budget": budget, "params_by_bases": by_bases, "basis_kv": bool(whole),
             "choice_seconds": round(t_choice, 1),
             "select_seconds": round(t1 - t0, 1), "refit_seconds": round(time.perf_counter() - t1, 1)}
    return new_plan(model, name, cfg.ratio, pruned=sorted(pruned), notes=notes, fitted=fitted,
                    base_sha1=base, bases=[{"layers": g, "rank": r, **({"kv": True} if whole else {})}
                                                      for g, r in chosen])


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


# --- select="heldout": per group, a rank or no basis; per layer, the units to prune; by cross-fitted error ---

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
def _choice_costs(model, data, layout, xs, groups, ins, subsets, rho: float, split: int, progress: bool) -> dict:
    """{(layer, rank or None): {subset: cross-fitted error per token}}: the layer's attention output error
    when `subset` is pruned, its q/k/v rows are put on its group's whitened basis of that rank (None: left
    dense) and the o columns that stay are refitted. The basis is fitted on one fold of the tokens (all rows of
    the group, whatever is pruned later), the o refit on the same fold, the error measured on the other."""
    from tqdm.auto import tqdm

    bl, apath = blocks(model), arch_spec(layout.model_type).attention
    op = layout.o_projection()
    U, n = layout.units_per_layer, xs[0].shape[0]
    folds = (slice(0, split), slice(split, n))
    cols = [op.unit_index(u) for u in range(U)]
    costs = {}
    got: dict = {}  # the o projection's input of the last attention run
    steps = sum(len(g) * (1 + 2 * len(_rank_grid(layout.hidden_size, _group_rows(layout, ins, g))))
                for g in groups)
    bar = tqdm(total=steps, desc="choice costs", disable=not progress, unit="run")
    for g in groups:
        full = {layer: {p.path: _orient(bl[layer].get_submodule(p.path).weight, p.conv1d).double() for p in ins}
                for layer in g}
        w = torch.cat([full[layer][p.path] for layer in g for p in ins])
        ranks = _rank_grid(layout.hidden_size, w.shape[0])
        factors = [_whitened_basis(torch.cat([xs[layer][f] for layer in g]), w, max(ranks)) for f in folds]
        for layer in g:
            d, block = data[layer], bl[layer]
            o = block.get_submodule(op.path)
            wo = _orient(o.weight, op.conv1d).double()  # (D, in)
            a = d.z.double() @ wo.T  # the attention output without the o bias: what the refit must match
            dense = [_fold_stats(d.z, a, d.w, f) for f in folds]
            costs[(layer, None)] = _subset_errors((dense[0], dense[1]), (dense[1], dense[0]), wo, cols,
                                                  subsets[layer], rho, n)
            bar.update()
            saved = {p.path: block.get_submodule(p.path).weight.data.clone() for p in ins}
            hook = o.register_forward_pre_hook(lambda _m, args: got.__setitem__("z", args[0]))
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
                        args, kwargs = d.attn_call
                        block.get_submodule(apath)(*args, **kwargs)
                        z = got["z"].reshape(-1, got["z"].shape[-1])
                        fits.append(_fold_stats(z, a, d.w, folds[f]))
                        evals.append(_fold_stats(z, a, d.w, folds[1 - f]))
                        bar.update()
                    costs[(layer, r)] = _subset_errors(tuple(fits), tuple(evals), wo, cols, subsets[layer], rho, n)
            finally:
                hook.remove()
                for p in ins:
                    block.get_submodule(p.path).weight.data.copy_(saved[p.path])
    bar.close()
    return costs


def _own_rows(layout, p, layer: int, pruned) -> torch.Tensor:
    """The rows of projection `p` in `layer` that stay when `pruned` goes (all of them if no unit owns `p`)."""
    if p in layout.layer_projections():
        return own_index(p, [0])
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
        raise ValueError(f"no choice of pruning and bases removes {budget} parameters")
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
