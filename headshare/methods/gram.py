"""One layer's inner products of unit outputs on calibration tokens, computed from Gram blocks of the heads'
outputs without forming the outputs themselves."""

from __future__ import annotations

import torch


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
            self.chol = torch.linalg.cholesky(gk + lam * torch.eye(gk.shape[0], dtype=gk.dtype, device=gk.device))

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
