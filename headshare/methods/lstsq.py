"""Least squares on calibration features: ridge refits, scales fitted jointly with them, cross-fitting, and
the knapsack that spends a unit budget over layers.

Everything here works on captured features (heads' outputs z, o columns W, token weights w) and never
touches a model.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch

from ..arch import Layout

if TYPE_CHECKING:
    from .calibration import LayerData

SHORTLIST = 4  # fitshare ranks this many sources per unit under every refit (chosen from all by plain gain)
EXHAUSTIVE = 6  # layers with up to this many units weigh every subset of them; beyond, a greedy nested few
LENDERS = 4  # up to this many candidate borrowers a layer, every subset of them is cross-fitted; beyond, greedily


class RidgeResidual:
    """min_D ||v - Z D||_w^2 + lam ||D||^2 for many targets v: the fitted D and the S inner product.

    <a, b>_S = a'Wb - a'WZ (Z'WZ + lam)^-1 Z'Wb is the weighted inner product left after the refit
    (<v, v>_S is the minimum itself), which lets a few extra scalars (borrowed units' scales) be fitted
    jointly with D in closed form. lam = rho x the mean diagonal of Z'WZ. Z may have no columns.
    """

    def __init__(self, z: torch.Tensor | None, w: torch.Tensor, rho: float):
        self.z, self.w = z, w
        if z is not None and z.shape[1]:
            g = z.T @ (z * w)
            self.chol = torch.linalg.cholesky(g + rho * g.diagonal().mean().clamp_min(1e-30)
                                              * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
        else:
            self.z = None

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(self.z.T @ (v * self.w), self.chol)

    def inner(self, a: torch.Tensor, b: torch.Tensor) -> float:
        val = (a * b * self.w).sum()
        if self.z is not None:
            val = val - ((self.z.T @ (a * self.w)) * self.solve(b)).sum()
        return float(val)


class LayerGram:
    """Inner products of unit outputs y = z W^T on one layer's calibration tokens, without forming them.

    Features are heads' outputs (N, width) under a key: ("own", u) for the layer's units, a (layer, unit)
    source for borrowed ones (`key` gives it per unit, `calibration.source_key`; key[:2] is the source), each with its o columns W (D, width). With a kept set K whose o columns are
    refitted, <a, b>_S = sum((W_a'W_b) * (G_ab - X_a'X_b)), G_ab = z_a'W z_b (W the token weights) and
    X = L^-1 G_K. for L the Cholesky factor of G_KK + lam: width x width work per pair once the Gram
    blocks exist (computed lazily in float32, accumulated per block, kept in float64).
    """

    def __init__(self, feats: dict, o_cols: dict, w: torch.Tensor, key=None):
        # key(source, unit): the feature key of a source borrowed by one of the layer's units
        self.key = key or (lambda s, u: tuple(s))
        self.z = {k: z.float() for k, z in feats.items()}
        self.zw = {k: z * w.float() for k, z in self.z.items()}
        self.o = o_cols
        self.n = next(iter(feats.values())).shape[0]
        self._g: dict = {}
        self._ww: dict = {}
        self._x: dict = {}
        self.kept: list = []
        self.chol = None

    def g(self, a, b) -> torch.Tensor:
        if (a, b) not in self._g:
            self._g[(a, b)] = (self.z[a].T @ self.zw[b]).double()
            self._g[(b, a)] = self._g[(a, b)].T
        return self._g[(a, b)]

    def ww(self, a, b) -> torch.Tensor:
        if (a, b) not in self._ww:
            self._ww[(a, b)] = self.o[a].T @ self.o[b]
            self._ww[(b, a)] = self._ww[(a, b)].T
        return self._ww[(a, b)]

    def set_kept(self, kept: list, rho: float) -> None:
        """Refit the o columns of these keys from now on (an empty list: plain weighted inner products)."""
        self.kept, self._x, self.chol = list(kept), {}, None
        if kept:
            gk = torch.cat([torch.cat([self.g(a, b) for b in kept], 1) for a in kept], 0)
            lam = rho * gk.diagonal().mean().clamp_min(1e-30)
            self.chol = torch.linalg.cholesky(gk + lam * torch.eye(gk.shape[0], dtype=gk.dtype))

    def _xk(self, a) -> torch.Tensor:
        if a not in self._x:
            gka = torch.cat([self.g(k, a) for k in self.kept], 0)
            self._x[a] = torch.linalg.solve_triangular(self.chol, gka, upper=False)
        return self._x[a]

    def inner(self, a, b) -> float:
        g = self.g(a, b)
        if self.kept:
            g = g - self._xk(a).T @ self._xk(b)
        return float((self.ww(a, b) * g).sum())

    def gains(self, unit, sources) -> list[tuple[float, tuple, float]]:
        """[(share of <y, y>_S a fitted scale on the source removes, source, scale)], best first."""
        yy = self.inner(unit, unit)
        out = []
        for s in sources:
            cc, cy = self.inner(s, s), self.inner(s, unit)
            a = cy / cc if cc > 0 else 0.0
            out.append((a * cy / yy if yy > 0 else 0.0, s, a))
        return sorted(out, key=lambda t: (-t[0], t[1]))

    def cost(self, removed: list, lent: dict) -> float:
        """Error per token left when `removed` own units go, the kept ones are refitted and the units in
        `lent` ({unit: source}) borrow with scales fitted jointly."""
        ys = [("own", u) for u in removed]
        vv = sum(self.inner(a, b) for a in ys for b in ys)
        if lent:
            cs = list(lent.values())
            m = torch.tensor([[self.inner(a, b) for b in cs] for a in cs], dtype=torch.float64)
            r = torch.tensor([sum(self.inner(a, y) for y in ys) for a in cs], dtype=torch.float64)
            m = m + 1e-12 * m.diagonal().abs().max().clamp_min(1e-30) * torch.eye(len(cs), dtype=torch.float64)
            vv = vv - float(r @ torch.linalg.solve(m, r))
        return max(vv, 0.0) / self.n


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
    layer; beyond (query-head units: 9 a layer on SmolLM2, 511 subsets) the nested ones a greedy order gives,
    each step removing the unit whose loss the refit of the others leaves least (in-sample, cheap)."""
    if units <= EXHAUSTIVE:
        return [c for k in range(1, units + 1) for c in itertools.combinations(range(units), k)]
    order: list[int] = []
    out = []
    while len(order) < units:
        def cost(u: int) -> float:
            removed = [*order, u]
            gram.set_kept([("own", v) for v in range(units) if v not in removed], rho)
            return gram.cost(removed, {})

        order.append(min((u for u in range(units) if u not in order), key=lambda u: (cost(u), u)))
        out.append(tuple(sorted(order)))
    return out


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
        raise ValueError(f"cannot remove {n} units from {L} layers")
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


def heldout_share_costs(gram: LayerGram, options: dict, data: LayerData, layout: Layout, rho: float,
                        rows: int, min_gain: float) -> dict:
    """{frozenset(removed units): error per token} with the kept units' refit *and* the removed units'
    borrowing cross-fitted (fitted on one half of the calibration sequences and measured on the other, both
    ways round): for each subset, its candidates (best source with an in-sample gain >= `min_gain`) are
    weighed by `heldout_lending`, which also drops those that do not pay off held out. With `min_gain`
    infinite nothing lends and the cost is the cross-fitted error of pruning the subset.

    In-sample costs flatter the refit most where it overfits, which steers the selection towards units that
    only look cheap to compensate; on SmolLM2 the held-out error of a refit with a small ridge was above not
    refitting at all in some layers (BENCHMARKS.md)."""
    U = layout.units_per_layer
    z = {u: gram.z[("own", u)].double() for u in range(U)}
    y = {u: z[u] @ gram.o[("own", u)].T for u in range(U)}
    n = data.w.shape[0]
    split = half(n, rows)
    out = {}
    for removed, (_, _, ranked) in options.items():
        kept = [u for u in range(U) if u not in removed]
        kz = torch.cat([z[u] for u in kept], 1) if kept else None
        v = sum(y[u] for u in removed)
        ys = {u: gram.z[r[0][1]].double() @ gram.o[r[0][1]].T for u, r in ranked.items()
              if r and r[0][0] >= min_gain}
        out[removed] = heldout_lending(kz, v, data.w, ys, rho, split)[1] / n
    return out


