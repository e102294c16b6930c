"""choiceshare's held-out choice: per group of layers a basis rank or none, per layer the units to prune, for
the least summed cross-fitted error that removes the budget; the cost tables and the allocation."""

from __future__ import annotations

import math

import torch

from ...arch import blocks
from ...errors import HeadshareError
from ..lstsq import CHAIN_DTYPE, EXHAUSTIVE, chain_order, nested_prune_errors
from .bases import group_rows, layer_groups, layer_weight, orient, whitened_basis

RANKS = 8  # default for `ChoiceShareConfig.ranks`: rank candidates a group, evenly spaced up to where factors stop paying


BINS = 20_000  # resolution of the parameter budget in the allocation (item savings rounded down, so never short)


def heldout_choice(model, walk_again, layout, grams, ins, cfg, subsets: dict, split: int, budget: int):
    """choiceshare's held-out choice: per group of `group` layers a rank or no basis, per layer the units to prune (among
    `subsets`), for the least summed cross-fitted error (`choice_costs`) that removes the budget (`allocate`)."""
    groups = layer_groups(layout.num_layers, cfg.group)
    costs = choice_costs(model, walk_again, layout, grams, groups, ins, subsets, cfg.rho, split, cfg.ranks)
    options = {}
    for (layer, r), by_subset in costs.items():
        options[(layer, r)] = {s: (c, group_rows(layout, ins, [layer], {(layer, u) for u in s}))
                               for s, c in by_subset.items()}
    pruned, ranks = allocate(groups, options, budget, layout.unit_params(), layout.hidden_size)
    chosen = [(g, ranks[tuple(g)]) for g in groups if ranks[tuple(g)] is not None]
    # the bases are refitted on the rows that stay: a group whose rows are all pruned has nothing to share
    chosen = [(g, r) for g, r in chosen if group_rows(layout, ins, g, pruned)]
    return pruned, chosen


def rank_grid(h: int, m: int, steps: int = RANKS) -> list[int]:
    """Up to `steps` evenly spaced ranks worth weighing for a group of m rows on hidden size h: below h m / (h + m),
    where the factors stop being smaller than the rows."""
    top = (h * m) // (h + m)
    step = max(1, top // steps)
    return sorted({step * k for k in range(1, steps + 1) if 1 <= step * k < top})


def fold_stats(z: torch.Tensor, a: torch.Tensor, w: torch.Tensor, part: slice) -> tuple:
    """(Z'WZ, Z'Wa, a'Wa) of one fold of the tokens (Grams in float32, kept in float64)."""
    zf, af, wf = z[part].float(), a[part].float(), w[part].float()
    zw = zf * wf
    return (zf.T @ zw).double(), (zw.T @ af).double(), float((af.double() ** 2 * w[part]).sum())


def subset_errors(fits: tuple, evals: tuple, wo: torch.Tensor, cols: list[torch.Tensor], subsets: list,
                   rho: float, n: int, fixed_ridge: bool = False) -> dict:
    """{subset: error per token} when `subset` is pruned and the other units' o columns (`wo`, (D, in)) are
    refitted on one fold and the error measured on the other, both ways round (`fits[i]`, `evals[i]`: fold
    statistics of direction i). The ridge is on the change of the columns, as in `heldout_share_costs`; its
    strength rho x the mean diagonal of the kept columns' fold Gram (`fixed_ridge`: of all the columns', what
    `nested_prune_errors` computes)."""
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
            lam = rho * (ga if fixed_ridge else gk).diagonal().mean().clamp_min(1e-30)
            chol = torch.linalg.cholesky(gk + lam * torch.eye(len(k), dtype=gk.dtype, device=gk.device))
            x = m + torch.cholesky_solve(ca[k] - gk @ m, chol)
            err += aab - 2 * float((x * cb[k]).sum()) + float((x * (gb[k][:, k] @ x)).sum())
        out[s] = max(err, 0.0) / n
    return out


def nested_stats(z: torch.Tensor, z0: torch.Tensor | None, w: torch.Tensor, wo: torch.Tensor, folds) -> tuple:
    """The folds' statistics `nested_prune_errors` takes for columns z (their o weight `wo`, (D, in)) and the
    target z0 wo' (None: z itself): (Z'WZ per fold, (Z'W E wo', sum w |E wo'|^2) per fold with E = z0 - z, or
    None). The products are summed in float32 and kept so (the float32 chain reads them as they are; 256 MB
    less on a 7B layer than float64 copies)."""
    grams, base = [], []
    for part in folds:
        zf, wf = z[part].float(), w[part].float()
        zw = zf * wf
        grams.append(zf.T @ zw)
        if z0 is not None:
            ew = (z0[part].float() - zf) @ wo.float().T  # what E does to the output
            base.append((zw.T @ ew, float((ew.double() ** 2 * w[part]).sum())))
    return tuple(grams), (tuple(base) if z0 is not None else None)


@torch.no_grad()
def choice_costs(model, walk_again, layout, grams, groups, ins, subsets, rho: float, split: int,
                 steps: int = RANKS) -> dict:
    """{(layer, rank or None): {subset: cross-fitted error per token}}: the layer's attention output error
    when `subset` is pruned, its q/k/v rows are put on its group's whitened basis of that rank (None: left
    dense) and the o columns that stay are refitted. The basis is fitted on one fold of the tokens (all rows of
    the group, whatever is pruned later; `grams[group][fold]` are the fold's input Grams), the o refit on the
    same fold, the error measured on the other. One walk of the calibration pipeline (`walk_again()`); a
    group's fold bases exist only while its layers are walked.

    Beyond `EXHAUSTIVE` units a layer (query heads) the subsets are the greedy's nested ones and take
    `nested_prune_errors`, one downdated factorisation per rank and fold at the ridge fixed per layer and
    fold (`CHAIN_DTYPE`), with the projection's error E = z0 - z as columns removed from the start; otherwise
    each subset is solved on its own (`subset_errors`, each kept set's own ridge)."""
    bl = blocks(model)
    op = layout.o_projection()
    U = layout.units_per_layer
    cols = [op.unit_index(u) for u in range(U)]
    perm = torch.cat(cols)
    widths = [len(c) for c in cols]
    group_of = {layer: i for i, g in enumerate(groups) for layer in g}
    # k and v with query-head units: no basis carries them, so their outputs are the same at every rank
    fixed = tuple(p.path for p in layout.layer_projections() if p.path not in {q.path for q in ins})
    costs = {}
    factors, ranks = None, None
    for layer, d in walk_again():
        n = d.z.shape[0]
        folds = (slice(0, split), slice(split, n))
        g = groups[group_of[layer]]
        dev = d.z.device
        if layer == g[0]:  # the group's fold bases, from the weights of all its layers (read one at a time)
            ranks = rank_grid(layout.hidden_size, group_rows(layout, ins, g), steps)
            factors = [tuple(x.to(CHAIN_DTYPE) for x in whitened_basis(
                grams[group_of[layer]][f].to(dev),
                (layer_weight(bl, (la, p.path), ins).to(dev) for la in g for p in ins), max(ranks)))
                for f in (0, 1)]  # only the rows put on them read them, in CHAIN_DTYPE (the block runs fp32 or narrower)
        block = bl[layer]
        wo = orient(block.get_submodule(op.path).weight, op.conv1d).double()  # (D, in)
        order = chain_order(subsets[layer]) if U > EXHAUSTIVE and len(perm) == wo.shape[1] else None
        if order is None:
            a = d.z.double() @ wo.T  # the attention output without the o bias: what the refit must match
            dense = [fold_stats(d.z, a, d.w, f) for f in folds]
            costs[(layer, None)] = subset_errors((dense[0], dense[1]), (dense[1], dense[0]), wo, cols,
                                                  subsets[layer], rho, n)
        else:
            wop = wo[:, perm]
            fg, _ = nested_stats(d.z[:, perm], None, d.w, wop, folds)
            errs = nested_prune_errors(fg, wop, widths, order, rho, dtype=CHAIN_DTYPE)
            costs[(layer, None)] = {s: max(errs[len(s)], 0.0) / n for s in subsets[layer]}
        saved = {p.path: block.get_submodule(p.path).weight.data.clone() for p in ins}
        own = {p.path: layer_weight(bl, (layer, p.path), ins).to(dev, CHAIN_DTYPE) for p in ins}
        fits, evals = {r: [] for r in ranks}, {r: [] for r in ranks}
        errs = {r: [0.0] * (len(order or []) + 1) for r in ranks}
        try:
            for f, (basis, coef_map) in enumerate(factors):
                # the layer's rows on fold f's basis, built up rank by rank: the next rank's are the last one's
                # plus the basis rows between them, so the whole grid costs about what the largest rank costs
                on_basis = {path: torch.zeros_like(w) for path, w in own.items()}
                done = 0
                for r in ranks:
                    for p in ins:
                        on_basis[p.path].addmm_(own[p.path] @ coef_map[:, done:r], basis[done:r])
                        block.get_submodule(p.path).weight.data.copy_(orient(on_basis[p.path], p.conv1d))
                    done = r
                    z = d.attention_z(block, layout, fixed)
                    if order is None:
                        fits[r].append(fold_stats(z, a, d.w, folds[f]))
                        evals[r].append(fold_stats(z, a, d.w, folds[1 - f]))
                        continue
                    # direction f fits on fold f with fold f's basis, so it has columns of its own
                    fg, base = nested_stats(z[:, perm], d.z[:, perm], d.w, wop, folds)
                    one = nested_prune_errors(fg, wop, widths, order, rho, base=base, directions=((f, 1 - f),),
                                              dtype=CHAIN_DTYPE)
                    errs[r] = [x + y for x, y in zip(errs[r], one, strict=True)]
                del on_basis
        finally:
            for p in ins:
                block.get_submodule(p.path).weight.data.copy_(saved[p.path])
        for r in ranks:
            if order is None:
                costs[(layer, r)] = subset_errors(tuple(fits[r]), tuple(evals[r]), wo, cols, subsets[layer], rho, n)
            else:
                costs[(layer, r)] = {s: max(errs[r][len(s)], 0.0) / n for s in subsets[layer]}
        if layer == g[-1]:
            factors = None
    return costs


def allocate(groups, options: dict, budget: int, unit_params: int, h: int) -> tuple[set, dict]:
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
