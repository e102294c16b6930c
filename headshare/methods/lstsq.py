"""Least squares on calibration features: ridge refits, scales fitted jointly with them, cross-fitting, and
the knapsack that spends a unit budget over layers.

Everything here works on captured features (heads' outputs z, o columns W, token weights w) and never
touches a model.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..arch import Layout
from ..errors import HeadshareError
from .calibration import CHUNK_ROWS, LayerData
from .gram import LayerGram

SHORTLIST = 4  # fitshare ranks this many sources per unit under every refit (chosen from all by plain gain)
EXHAUSTIVE = 6  # layers with up to this many units weigh every subset of them; beyond, a greedy nested few
LENDERS = 4  # up to this many candidate borrowers a layer, every subset of them is cross-fitted; beyond, greedily

# the downdated chains (`nested_prune_errors`) of the selections compute in float32, the inner products that make
# each error summed in float64: 1.75-1.85x faster on a CPU, within 2e-8 of the smallest step between subsets of
# float64's on Qwen's and the 7B's shapes
CHAIN_DTYPE = torch.float32


class RidgeResidual:
    """min_D ||v - Z D||_w^2 + lam ||D||^2 for many targets v: the fitted D and the S inner product.

    <a, b>_S = a'Wb - a'WZ (Z'WZ + lam)^-1 Z'Wb is the weighted inner product left after the refit
    (<v, v>_S is the minimum itself), which lets a few extra scalars (borrowed units' scales) be fitted
    jointly with D in closed form. lam = rho x the mean diagonal of Z'WZ. Z may have no columns.
    """

    def __init__(self, z: torch.Tensor | None, w: torch.Tensor, rho: float):
        self.z, self.w = z, w
        if z is not None and z.shape[1]:
            self.chol = ridge_cholesky(z.T @ (z * w), rho)
        else:
            self.z = None

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(self.z.T @ (v * self.w), self.chol)

    def inner(self, a: torch.Tensor, b: torch.Tensor) -> float:
        val = (a * b * self.w).sum()
        if self.z is not None:
            val = val - ((self.z.T @ (a * self.w)) * self.solve(b)).sum()
        return float(val)


def refit_moments(z: torch.Tensor, idx: torch.Tensor, t: torch.Tensor, wk: torch.Tensor, w: torch.Tensor,
                  part: slice, bias: torch.Tensor | None = None,
                  chunk: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(K'WK, K'Wv, v'Wv) over the token rows `part` for the refit of kept columns K = z[:, idx] toward
    v = t - bias - K wk' (t: the target (N, D), any float dtype; wk: the kept columns' o weights (D, k)), summed
    `chunk` rows at a time in float64: the sufficient statistics of `RidgeResidual(K, w, rho).solve(v)` and of
    its error on other rows."""
    k = len(idx)
    g = torch.zeros(k, k, dtype=torch.float64, device=z.device)
    c = torch.zeros(k, t.shape[1], dtype=torch.float64, device=z.device)
    vv = 0.0
    for s in range(part.start, part.stop, chunk):
        r = slice(s, min(s + chunk, part.stop))
        kz, wr = z[r][:, idx].double(), w[r]
        v = t[r].double() - kz @ wk.T
        if bias is not None:
            v -= bias
        g += kz.T @ (kz * wr)
        c += kz.T @ (v * wr)
        vv += float((v ** 2 * wr).sum())
    return g, c, vv


def ridge_cholesky(g: torch.Tensor, rho: float) -> torch.Tensor:
    """The Cholesky factor of g + lam, lam = rho x the mean diagonal of the Gram g: every ridge refit's."""
    return torch.linalg.cholesky(g + rho * g.diagonal().mean().clamp_min(1e-30)
                                 * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))


def ridge_from_moments(g: torch.Tensor, c: torch.Tensor, rho: float) -> torch.Tensor:
    """The ridge fit (g + lam)^-1 c, as `RidgeResidual.solve` makes it from the tokens."""
    return torch.cholesky_solve(c, ridge_cholesky(g, rho))


def least_crossfit(errors: dict) -> float | None:
    """The ridge with the least cross-fitted error in {ridge or None (no refit): error}; ties go to no
    refit, then to the smaller ridge."""
    return min(errors, key=lambda r: (errors[r], r is not None, r or 0.0))


def crossfit_errors(folds: list[tuple], ridges: tuple[float, ...]) -> dict:
    """{ridge or None (no refit): the error left on one fold by the ridge fit (`ridge_from_moments`) on the
    other, summed both ways round}, from the two folds' moments (g, c, vv): the Gram of the columns that may
    change, their products with what is left to fit, and that residual's energy."""
    tried = {None: folds[0][2] + folds[1][2]}
    for r in ridges:
        err = 0.0
        for (ga, ca, _), (gb, cb, vvb) in ((folds[0], folds[1]), (folds[1], folds[0])):
            d = ridge_from_moments(ga, ca, r)
            err += vvb - 2 * float((d * cb).sum()) + float((d * (gb @ d)).sum())
        tried[r] = err
    return tried


def crossfit_moments(folds: list[tuple], ridges: tuple[float, ...]) -> float | None:
    """`crossfit_ridge` without borrowers, from the two folds' `refit_moments`: the ridge (or None, no refit)
    whose fit on one fold leaves the least error on the other, both ways round (`crossfit_errors`); ties to no
    refit, then to the smaller ridge."""
    return least_crossfit(crossfit_errors(folds, ridges))


def fit_scales(fit: RidgeResidual, v: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
    """Scales a minimising min_D ||v - sum a_i y_i - Z D||_w^2 + lam||D||^2 (ridge only on D)."""
    if not ys:
        return torch.zeros(0, dtype=torch.float64)
    m = torch.tensor([[fit.inner(a, b) for b in ys] for a in ys], dtype=torch.float64)
    r = torch.tensor([fit.inner(a, v) for a in ys], dtype=torch.float64)
    m = m + 1e-12 * m.diagonal().abs().max().clamp_min(1e-30) * torch.eye(len(ys), dtype=torch.float64)
    return torch.linalg.solve(m, r)


def candidate_subsets(gram: LayerGram, units: int, rho: float) -> list[tuple[int, ...]]:
    """The subsets of a layer's units that the selection weighs: all of them up to `EXHAUSTIVE` units a
    layer; beyond (query-head units: 9 a layer on SmolLM2, 511 subsets; 32 on a 7B model) the nested ones a
    greedy order gives, each step removing the unit whose in-sample loss, with the o columns of the others
    refitted, is least (`greedy_order`; the ridge is rho x the mean diagonal of the whole layer's Gram)."""
    if units <= EXHAUSTIVE:
        return [c for k in range(1, units + 1) for c in itertools.combinations(range(units), k)]
    keys = [("own", u) for u in range(units)]
    g = torch.cat([torch.cat([gram.g(a, b) for b in keys], 1) for a in keys], 0)
    ww = torch.cat([torch.cat([gram.ww(a, b) for b in keys], 1) for a in keys], 0).to(g.dtype)
    lam = rho * float(g.diagonal().mean().clamp_min(1e-30))
    return greedy_order(g, ww, [gram.z[k].shape[1] for k in keys], lam)


def greedy_order(g: torch.Tensor, ww: torch.Tensor, widths: list[int], lam: float) -> list[tuple[int, ...]]:
    """Nested subsets of a layer's units, one per size: each step removes the unit u whose removal, with the
    o columns of the rest refitted by ridge `lam`, leaves the least in-sample error
    sum over a, b in R of <W_a'W_b, G_ab - G_aK (G_KK + lam)^-1 G_Kb> (R the removed units with u, K the
    others; ties to the lower index). `g` and `ww` are the layer's Gram (z_a' W z_b) and o-column products
    (W_a'W_b) over all its units, in blocks of `widths`.

    One factorisation for the whole order, as in OBS and SparseGPT: H = (G_KK + lam)^-1 is kept and
    downdated by a unit's block as it leaves (H_KK - H_Ku H_uu^-1 H_uK), with P = H G_KR and F = P W_RR.
    Then, for a candidate u, with Q = [P_R, H_u. G_Ku] at u's rows (H_u. G_Ku = I - lam H_uu, since
    H (G_KK + lam) = I):

        cost(R + u) = cost(R) + 2 lam <W_Ru, Q_R'> + lam <W_uu, Q_u> + <H_uu^-1, Q W_{R+u,R+u} Q'>

    d x d work per candidate (d its width) and K x d x (K + R) per step: a layer of 32 units of 128 costs
    about a second a step, where a factorisation per candidate costs minutes. The ridge is fixed
    for the order (a kept set's own mean diagonal would change H by a multiple of I at every step, which no
    downdate follows); the costs the selection then weighs are computed with each subset's own ridge."""
    units = len(widths)
    off = _offsets(widths)
    dtype = g.dtype
    kept, removed = list(range(units)), []
    h = torch.cholesky_inverse(torch.linalg.cholesky(g + lam * torch.eye(g.shape[0], dtype=dtype, device=g.device)))
    p = g.new_zeros(g.shape[0], 0)  # H G_KR: rows the kept units' blocks in `kept` order, columns R's
    f = g.new_zeros(g.shape[0], 0)  # P W_RR
    wr = g.new_zeros(g.shape[0], 0)  # W_.R: rows in the layer's order
    base = 0.0  # cost(R)
    tiny = 1e-12 * abs(float((ww * g).sum()))  # of the cost of removing every unit
    out = []
    while len(kept) > 1:
        koff = _offsets([widths[u] for u in kept])
        best = None
        for i, u in enumerate(kept):
            sl, su = slice(koff[i], koff[i + 1]), slice(off[u], off[u + 1])
            huu, wuu = h[sl, sl], ww[su, su]
            qu = torch.eye(widths[u], dtype=dtype, device=huu.device) - lam * huu
            s = qu @ wuu @ qu.T
            cost = base + lam * float((wuu * qu).sum())
            if removed:
                qr, wur = p[sl], wr[su]
                cost += 2 * lam * float((wur * qr).sum())
                x = qr @ wur.T @ qu.T
                s = s + f[sl] @ qr.T + x + x.T
            cost += float(torch.cholesky_solve(s, torch.linalg.cholesky(huu)).diagonal().sum())
            # costs within rounding of zero (a silent unit's) count as zero, so that they tie and go by index
            key = (cost if cost > tiny else 0.0, u)
            if best is None or key < best[0]:
                best = (key, cost, i)
        (_, u), base, i = best
        sl, su = slice(koff[i], koff[i + 1]), slice(off[u], off[u + 1])
        rows = torch.cat([torch.arange(0, sl.start), torch.arange(sl.stop, h.shape[0])])
        a = (h[:, sl] @ torch.linalg.inv(h[sl, sl]))[rows]  # H_Ku H_uu^-1, on the rows that stay
        wur, wuu = wr[su], ww[su, su]
        p = p[rows].sub_(a @ p[sl])
        f = f[rows].sub_(a @ f[sl])
        # u joins R: its column block of P is -H_Ku H_uu^-1 (what the downdated H makes of G_Ku)
        f = torch.cat([f.sub_(a @ wur), p @ wur.T - a @ wuu], 1)
        p = torch.cat([p, -a], 1)
        h = h.index_select(0, rows).index_select(1, rows).sub_(a @ h[sl].index_select(1, rows))
        wr = torch.cat([wr, ww[:, su]], 1)
        kept.pop(i)
        removed.append(u)
        out.append(tuple(sorted(removed)))
    out.append(tuple(range(units)))
    return out


def _offsets(widths: list[int]) -> list[int]:
    """Where each unit's block starts in a matrix whose blocks follow `widths` (and where the last ends)."""
    return [0, *itertools.accumulate(widths)]


def layer_options(gram: LayerGram, units: int, sources: list, rho: float, min_gain: float) -> dict:
    """{frozenset(removed units): (cost, {unit: ranked sources})} for one layer: for every subset of its units
    (`candidate_subsets`), the error per token left after the other units' o columns are refitted and every
    removed unit whose best source removes >= `min_gain` of its own leftover borrows it (scale fitted); the
    ranked (gain, source) lists let a later step fall back when a source turns out to be removed itself."""
    # each unit's shortlist: the sources best before any refit (cheap), then ranked again under each refit
    gram.set_kept([], rho)
    short = {u: [s for _, s, _ in gram.gains(("own", u), [gram.key(x, u) for x in sources])[:SHORTLIST]]
             for u in range(units)}
    out = {}
    for removed in candidate_subsets(gram, units, rho):
        gram.set_kept([("own", u) for u in range(units) if u not in removed], rho)
        ranked = {u: [(g, s) for g, s, _ in gram.gains(("own", u), short[u])] for u in removed}
        lent = {u: r[0][1] for u, r in ranked.items() if r and r[0][0] >= min_gain}
        prune = gram.cost(list(removed), {})
        out[frozenset(removed)] = (gram.cost(list(removed), lent) if lent else prune, prune, ranked)
    return out


def half(n: int, rows: int) -> int:
    """Where the first cross-fitting fold ends: after half of the `rows` calibration sequences (of n
    tokens in all), or half the tokens if there is one sequence."""
    return (rows // 2) * (n // rows) if rows > 1 else n // 2


def knapsack(costs: list[dict], n: int) -> list[tuple[int, int]]:
    """One subset per layer (possibly empty), n units in all, least summed cost; ties to earlier layers."""
    inf = math.inf
    L = len(costs)
    best = [[inf] * (n + 1) for _ in range(L + 1)]
    back: list[list] = [[None] * (n + 1) for _ in range(L + 1)]
    best[0][0] = 0.0
    for layer in range(L):
        options = [(frozenset(), 0.0)] + sorted(costs[layer].items(), key=lambda kv: (len(kv[0]), sorted(kv[0])))
        for m in range(n + 1):
            if best[layer][m] == inf:
                continue
            for subset, c in options:
                mm = m + len(subset)
                if mm <= n and best[layer][m] + c < best[layer + 1][mm]:
                    best[layer + 1][mm] = best[layer][m] + c
                    back[layer + 1][mm] = (subset, m)
    if best[L][n] == inf:
        raise HeadshareError(f"cannot remove {n} units from {L} layers")
    chosen, m = [], n
    for layer in range(L, 0, -1):
        subset, m = back[layer][m]
        chosen += [(layer - 1, u) for u in subset]
    return sorted(chosen)


def heldout_lenders(kz: torch.Tensor | None, v: torch.Tensor, w: torch.Tensor, ys: dict, rho: float,
                    split: int) -> list:
    """The subset of candidate borrowers (keys of `ys`, each with its borrowed output) whose fitted scales,
    fitted with the kept units' o refit (features `kz`) to the target `v` on one half of the tokens, leave
    the least error on the other half, both ways round. Ties go to fewer borrowers. Beyond `LENDERS`
    candidates the subset is grown greedily instead of searched."""
    return heldout_lending(kz, v, w, ys, rho, split)[0]


def heldout_lending(kz: torch.Tensor | None, v: torch.Tensor, w: torch.Tensor, ys: dict, rho: float,
                    split: int) -> tuple[list, float]:
    """`heldout_lenders` and the cross-fitted error it leaves (summed over both halves)."""
    n = v.shape[0]
    folds = (slice(0, split), slice(split, n))
    fits = [RidgeResidual(kz[fa] if kz is not None else None, w[fa], rho) for fa, _ in (folds, folds[::-1])]

    def error(subset) -> float:
        err = 0.0
        for fit, (fa, fb) in zip(fits, (folds, folds[::-1]), strict=True):
            a = fit_scales(fit, v[fa], [ys[u][fa] for u in subset]).tolist()
            rest = v[fa] - sum((s * ys[u][fa] for u, s in zip(subset, a, strict=True)), torch.zeros_like(v[fa]))
            res = v[fb] - sum((s * ys[u][fb] for u, s in zip(subset, a, strict=True)), torch.zeros_like(v[fb]))
            if kz is not None:
                res = res - kz[fb] @ fit.solve(rest)
            err += float(((res ** 2) * w[fb]).sum())
        return err

    cands = sorted(ys)
    best, best_err = [], math.inf
    if len(cands) <= LENDERS:
        for k in range(len(cands) + 1):
            for subset in itertools.combinations(cands, k):
                err = error(subset)
                if err < best_err * (1 - 1e-9):
                    best, best_err = list(subset), err
        return best, best_err
    # many candidates (query-head units): add the one that lowers the held-out error most, while one does
    best_err = error(())
    while True:
        step = min(((error([*best, u]), u) for u in cands if u not in best), default=None)
        if step is None or not step[0] < best_err * (1 - 1e-9):
            return sorted(best), best_err
        best_err = step[0]
        best.append(step[1])


def crossfit_ridge(kz: torch.Tensor | None, v: torch.Tensor, w: torch.Tensor, ys: dict, split: int,
                   ridges: tuple[float, ...]) -> tuple[float | None, list]:
    """(ridge, borrowers) with the least cross-fitted error among each of `ridges` and no refit at all (None:
    the kept units' columns stay as they are), each with the borrowers that pay off under it
    (`heldout_lending`). Ties go to no refit, then to the smaller ridge."""
    tried = {r: heldout_lending(kz, v, w, ys, r, split) for r in ridges}
    tried[None] = heldout_lending(None, v, w, ys, 1.0, split)
    rho = least_crossfit({r: err for r, (_, err) in tried.items()})
    return rho, tried[rho][0]


def heldout_share_costs(gram: LayerGram, options: dict, data: LayerData, layout: Layout, rho: float,
                        rows: int, min_gain: float) -> dict:
    """{frozenset(removed units): error per token} with the kept units' refit *and* the removed units'
    borrowing cross-fitted (fitted on one half of the calibration sequences and measured on the other, both
    ways round): for each subset, its candidates (best source with an in-sample gain >= `min_gain`) are
    weighed by `heldout_lending`, which also drops those that do not pay off held out. With `min_gain`
    infinite nothing lends and the cost is the cross-fitted error of pruning the subset.

    In-sample costs flatter the refit most where it overfits, which steers the selection towards units that
    only look cheap to compensate; on SmolLM2 the held-out error of a refit with a small ridge was above not
    refitting at all in some layers (BENCHMARKS.md).

    Subsets without a candidate lender go to `heldout_prune_costs` (the same quantity from the folds' Grams,
    no per-subset work the size of the tokens or the hidden size)."""
    U = layout.units_per_layer
    lending = {removed: {u: r[0][1] for u, r in ranked.items() if r and r[0][0] >= min_gain}
               for removed, (_, _, ranked) in options.items()}
    out = heldout_prune_costs(gram, [r for r, lent in lending.items() if not lent], data, layout, rho, rows)
    if all(not lent for lent in lending.values()):
        return out
    z = {u: gram.z[("own", u)].double() for u in range(U)}
    y = {u: z[u] @ gram.o[("own", u)].T for u in range(U)}
    n = data.w.shape[0]
    split = half(n, rows)
    for removed, lent in lending.items():
        if not lent:
            continue
        kept = [u for u in range(U) if u not in removed]
        kz = torch.cat([z[u] for u in kept], 1) if kept else None
        v = sum(y[u] for u in removed)
        ys = {u: gram.z[s].double() @ gram.o[s].T for u, s in lent.items()}
        out[removed] = heldout_lending(kz, v, data.w, ys, rho, split)[1] / n
    return {r: out[r] for r in options}


def fold_grams(z: torch.Tensor, w: torch.Tensor, split: int, dtype: torch.dtype = torch.float64) -> tuple:
    """(Z'WZ of tokens [0, split), of tokens [split, n)): the two cross-fitting folds' Grams, accumulated in
    `dtype` and returned in float64. float32 is twice as fast; on a random layer of Llama-2-7B's shape it
    moved `prune_errors` by 1e-8 relative."""
    out = []
    for part in (slice(0, split), slice(split, z.shape[0])):
        zf = z[part].to(dtype)
        out.append((zf.T @ (zf * w[part].to(dtype))).double())
    return tuple(out)


def prune_errors(grams: tuple, wo: torch.Tensor, cols: list[torch.Tensor], subsets, rho: float, n: int,
                 fixed_ridge: bool = False) -> dict:
    """{subset: error per token} when the units of `subset` are pruned and the o columns of the others are
    refitted by ridge on one fold and the error of the attention output measured on the other, both ways round
    (direction i fits on `grams[i]`, Z'WZ of fold i over all o inputs, and measures on the other). `wo` is the
    o weight (D, in), `cols[u]` the input columns of unit u; the target is the attention output z wo' without
    bias, so this is `basis.heldout.subset_errors` and `heldout_share_costs(min_gain=inf)`: lam = rho x the mean
    diagonal of the kept columns' fold Gram, the ridge on the change of the columns.

    Why no per-subset work is D wide: with K the kept and R the other columns, the fold-a target left for
    the kept columns is z_R wo_R', so their change is Y wo_R' with Y = (G_KK + lam)^-1 G_KR (K x R, not K x D),
    and the fold-b error is <WW_RR, G_RR - 2 Y'G_KR + Y'G_KK Y> with WW = wo'wo, formed once. One Cholesky of
    the kept block per subset and fold, as the refit itself needs; the direct form's cancellation (a'Wa minus
    nearly as much) is avoided too. `fixed_ridge`: lam = rho x the mean diagonal of the whole fold Gram
    instead, what `nested_prune_errors` computes."""
    w2 = wo.detach().double()  # a module's weight may carry autograd; nothing here is differentiated
    ww = w2.T @ w2  # the only product over the hidden size, shared by every subset
    width = ww.shape[0]
    out = {}
    for s in subsets:
        k = torch.cat([cols[u] for u in range(len(cols)) if u not in s] or [torch.zeros(0, dtype=torch.long)])
        mask = torch.ones(width, dtype=torch.bool)
        mask[k] = False
        r = mask.nonzero().squeeze(1)  # the removed units' columns, and any column no unit owns
        wrr = ww[r][:, r]
        err = 0.0
        for ga, gb in (grams, grams[::-1]):
            gbr = gb[r]
            err += float((wrr * gbr[:, r]).sum())
            if not len(k):
                continue
            gk = ga[k][:, k]
            lam = rho * (ga if fixed_ridge else gk).diagonal().mean().clamp_min(1e-30)
            chol = torch.linalg.cholesky(gk + lam * torch.eye(len(k), dtype=gk.dtype, device=gk.device))
            y = torch.cholesky_solve(ga[k][:, r], chol)  # (K, R): the kept columns' change per removed column
            yw = y @ wrr
            err += float((yw * (gb[k][:, k] @ y - 2 * gbr[:, k].T)).sum())
        out[s] = max(err, 0.0) / n
    return out


def nested_prune_errors(grams: tuple, wo: torch.Tensor, widths: list[int], order: list[int], rho: float,
                        base: tuple | None = None, directions: tuple = ((0, 1), (1, 0)),
                        dtype: torch.dtype = torch.float64) -> list:
    """`prune_errors(..., fixed_ridge=True)` x n for the nested subsets order[:0], order[:1], ..., order[:n] (the
    k-th entry: the first k units of `order` pruned), units whose columns are consecutive blocks of `widths`
    (`grams`: the two folds' Grams in those blocks; `wo`: the o weight (D, in), its columns in those blocks).

    The same bookkeeping as `greedy_order`, per fitting fold a: H = (Ga_KK + lam)^-1 downdated as units leave.
    What the fold-b error needs of the refit is kept in the output space: M = H Ga_KR wo_R' (the kept columns'
    change, K x D), T = Gb_KR wo_R' and P = Gb_KK M - 2 T, so that the error is <wo_R Gb_RR wo_R'> + <M, P>;
    removing u (with a = H_Ku H_uu^-1 and c = M_u + wo_u') changes them by M -= a c, T += Gb_Ku wo_u',
    P -= Gb_KK a c + Gb_Ku wo_u'. Each step is then K x d x (K + D) whatever has been removed before, and the
    matrices live in fixed buffers whose leaving rows are overwritten (the last unit moved into the gap), not
    copied anew: on a layer of 32 heads of 128 about 3.5 times faster than carrying Y = H Ga_KR over the
    removed columns.

    `base` = ((X_0, e_0), (X_1, e_1)) when the columns are not the ones the target was made from: the target
    is z0 wo' and the columns z = z0 - E (choiceshare's basis-projected weights), so E's columns, with the
    same wo, are removed from the start: X_f = z_f' W E_f wo' (in x D) and e_f = sum w |E_f wo'|^2 on fold f.
    `directions`: the (fitting fold, measuring fold) pairs summed; one alone when each direction has columns
    of its own. `dtype`: what the products compute in (float32: about twice as fast on a CPU; the inner
    products that make each error are summed in float64 either way)."""
    off = _offsets(widths)
    width = wo.shape[1]
    wt = wo.T.to(dtype).contiguous()  # unit u's rows: wo_u'
    errs = [0.0] * (len(order) + 1)

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).sum(dtype=torch.float64))

    prod = wt.new_empty(wt.shape)  # <M, P> of every step: the products land here, not in a new array each time

    def dot_kd(a: torch.Tensor, b: torch.Tensor) -> float:
        # each row summed in the chain's dtype (ATen's cascade sum: a few roundings of the row's size), the
        # rows in float64; a float64 sum of the whole product first copied it to float64 (30 % of a 7B chain)
        out = torch.mul(a, b, out=prod[:a.shape[0]])
        return float(out.sum(1).sum(dtype=torch.float64))

    for ia, ib in directions:
        lam = rho * float(grams[ia].diagonal().double().mean().clamp_min(1e-30))
        ga = grams[ia].to(dtype)
        h = torch.cholesky_inverse(torch.linalg.cholesky(ga + lam * torch.eye(width, dtype=dtype, device=ga.device)))
        g = grams[ib].to(dtype, copy=True)  # Gb over the kept columns
        if base is None:
            m, t, p = (wt.new_zeros(wt.shape) for _ in range(3))
            rr = 0.0  # <wo_R Gb_RR wo_R'>
        else:
            m = h @ base[ia][0].to(dtype)
            t = base[ib][0].to(dtype, copy=True)
            p = torch.addmm(t, g, m, beta=-2)
            rr = float(base[ib][1])
        errs[0] += rr + dot_kd(m, p)
        kept, k = list(range(len(widths))), width  # units in the order of their rows; rows in use
        for step, u in enumerate(order, 1):
            koff = _offsets([widths[v] for v in kept])
            i = kept.index(u)
            s, e = koff[i], koff[i + 1]
            hk, gk = h[:k, :k], g[:k, :k]
            a = hk[:, s:e] @ torch.linalg.inv(hk[s:e, s:e])  # H_Ku H_uu^-1 (the identity at u's own rows)
            wu = wt[off[u]:off[u + 1]]
            rr += 2 * dot(wu, t[s:e]) + dot(wu, gk[s:e, s:e] @ wu)
            c = m[s:e] + wu
            gw = gk[:, s:e] @ wu
            m[:k].addmm_(a, c, alpha=-1)
            t[:k].add_(gw)
            p[:k].addmm_(gk @ a, c, alpha=-1).sub_(gw)
            hk.addmm_(a, hk[s:e].clone(), alpha=-1)
            # u's rows (and columns of H and Gb) leave: the last unit's move into them if it is as wide,
            # otherwise the rows after them shift up (none when u's are the last)
            if i < len(kept) - 1 and widths[kept[-1]] == e - s:
                last = k - (e - s)
                for x in (h, g):
                    x[s:e, :k] = x[last:k, :k]
                    x[:k, s:e] = x[:k, last:k]
                for x in (m, t, p):
                    x[s:e] = x[last:k]
                kept[i] = kept.pop()
            else:
                for x in (h, g):
                    x[s:k - (e - s), :k] = x[e:k, :k].clone()
                    x[:k, s:k - (e - s)] = x[:k, e:k].clone()
                for x in (m, t, p):
                    x[s:k - (e - s)] = x[e:k].clone()
                kept.pop(i)
            k -= e - s
            errs[step] += rr + dot_kd(m[:k], p[:k])
    return errs


def chain_order(subsets: list) -> list[int] | None:
    """The removal order whose prefixes include every subset, if the subsets are nested; None otherwise."""
    order: list[int] = []
    for s in sorted(subsets, key=len):
        if not set(order) <= s:
            return None
        order += sorted(s - set(order))
    return order


def heldout_prune_costs(gram: LayerGram, subsets, data: LayerData, layout: Layout, rho: float, rows: int) -> dict:
    """{subset: cross-fitted error per token of pruning it}: `heldout_share_costs(..., min_gain=math.inf)` for
    these subsets, by `prune_errors` on the folds' float64 Grams of the layer's own units (`gram`), the halves
    of the `rows` calibration sequences. Beyond `EXHAUSTIVE` units a layer, nested subsets (the greedy's) take
    `nested_prune_errors`, with the ridge fixed per layer and fold."""
    U = layout.units_per_layer
    subsets = list(subsets)
    if not subsets:
        return {}
    keys = [("own", u) for u in range(U)]
    z = torch.cat([gram.z[k].double() for k in keys], 1)
    wo = torch.cat([gram.o[k].double() for k in keys], 1)
    cols = [torch.arange(s, e) for s, e in itertools.pairwise(_offsets([gram.z[k].shape[1] for k in keys]))]
    n = data.w.shape[0]
    grams = fold_grams(z, data.w, half(n, rows))
    order = chain_order(subsets) if U > EXHAUSTIVE else None
    if order is None:
        return prune_errors(grams, wo, cols, subsets, rho, n)
    # the greedy's nested subsets (many units a layer): one downdated factorisation per fold, at the
    # ridge fixed for the layer as the greedy order has it
    errs = nested_prune_errors(grams, wo, [len(c) for c in cols], order, rho, dtype=CHAIN_DTYPE)
    return {s: max(errs[len(s)], 0.0) / n for s in subsets}
