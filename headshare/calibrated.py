"""Calibration-based methods: choose which attention units go, and what replaces them, from activations.

The paper matches heads by the cosine of their raw weights. On grouped-query models such as SmolLM2
those weights are nearly orthogonal (attention has exact symmetries that move weights without changing
the function), so weight matching picks almost unrelated pairs. The methods here look at what units
*do* on a little calibration text instead:

- `actshare` (activation-aware matching + scaled sharing): unit u may borrow source s at cost
  ||y_u - a * y_s->u||^2, the change in u's layer output on calibration text, with y_s->u the output
  of s's weights run on u's own layer input and `a` the least-squares scale (`Assignment.scale`).
  The cheapest units borrow. a = 0 would be pruning, so on the same units this is never worse than
  pruning them (on calibration). No weights change: the plan applies to the original model.
- `fitshare` (combination under one budget): which units go is chosen jointly per layer (every
  subset of a layer's units, then a knapsack over layers), each removed unit borrows its best source
  or is pruned, and the o-projection columns of the units that stay in those layers are refitted by
  ridge least squares so that the layer's attention output stays what it was, layer after layer on
  the modified model's own inputs. The plan needs those fitted weights (`notes["requires_weights"]`).
- `fitprune`: `fitshare` without sharing; the ablation that shows what sharing itself adds.

Every error is measured in units of the residual stream the output is added to: token t weighs
1 / ||h_t + a_t||^2 (h the block input, a the attention output). Raw output energy, the `prune`
baseline's importance, is blind to the residual norm growing with depth, and so removes the early
layers whose outputs are small in absolute terms but not relative to their residual stream.

All the model-specific work is done by the model's own modules (blocks and attention are re-run on
captured inputs with swapped unit slices), so what is measured is exactly what `share` computes.

    >>> plan = headshare.plan(model, ratio=0.3, method="fitshare", tokenizer=tok)  # edits model   # doctest: +SKIP
    >>> headshare.share(model, plan)                                                             # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .arch import Layout, ProjSpec, UnsupportedModelError, arch_spec, blocks, layout_of
from .methods import calibration_ids, fingerprint
from .plan import Assignment, SharePlan, new_plan, register_method, units_for_ratio

CALIB_TOKENS = 4096  # 8 windows of 512: 2048 gave 1.21x the original perplexity at 30 %, 4096 1.18x (BENCHMARKS.md)
RHO = 1.0  # ridge, relative to the mean diagonal of the Gram matrix: best held-out error (1e-2 overfitted)
WINDOW = 6  # sources are searched in this many preceding layers (the best ones were 1-5 layers back)
SHORTLIST = 4  # fitshare ranks this many sources per unit under every refit (chosen from all by plain gain)
MIN_GAIN = 0.01  # fitshare shares a unit only if borrowing removes >= 1 % of what the refit leaves
FITTED = "method-fitted"
SELECT = ("heldout", "pruning", "sharing")  # fitshare's subset costs: see heldout_share_costs and _fit_plan


# -- model access ---------------------------------------------------------------------------------------

def attention_path(layout: Layout) -> str:
    """Path (relative to a block) of the module that holds both the q/k/v and the o projections."""
    spec = arch_spec(layout.model_type)
    common = []
    for a, b in zip((spec.qkv or spec.q).split("."), spec.o.split("."), strict=False):
        if a != b:
            break
        common.append(a)
    if not common:
        raise UnsupportedModelError(f"{layout.model_type}: q and o projections have no common attention module")
    return ".".join(common)


def _in_proj(layout: Layout) -> list[ProjSpec]:
    return [p for p in layout.projections() if p.role == "out"]


def _o_proj(layout: Layout) -> ProjSpec:
    return next(p for p in layout.projections() if p.role == "in")


def _idx(proj: ProjSpec, unit: int, device) -> torch.Tensor:
    return proj.unit_index(unit).to(device)


def _get_slices(block: nn.Module, layout: Layout, unit: int) -> dict[str, tuple]:
    """Copies of one unit's weight (and bias) slices in every projection, in storage orientation."""
    out = {}
    for p in layout.projections():
        mod = block.get_submodule(p.path)
        idx = _idx(p, unit, mod.weight.device)
        w = mod.weight.detach().index_select(p.weight_dim(), idx).clone()
        b = mod.bias.detach()[idx].clone() if p.role == "out" and mod.bias is not None else None
        out[p.path] = (w, b)
    return out


def _set_slices(block: nn.Module, layout: Layout, unit: int, slices: dict[str, tuple], paths=None) -> None:
    for p in layout.projections():
        if paths is not None and p.path not in paths:
            continue
        mod = block.get_submodule(p.path)
        w, b = slices[p.path]
        idx = _idx(p, unit, mod.weight.device)
        mod.weight.data.index_copy_(p.weight_dim(), idx, w.to(mod.weight.dtype))
        if b is not None:
            mod.bias.data[idx] = b.to(mod.bias.dtype)


def _o_matrix(block: nn.Module, layout: Layout, unit: int) -> torch.Tensor:
    """(hidden, width) float64: the o-projection columns of one unit, in nn.Linear orientation."""
    p = _o_proj(layout)
    mod = block.get_submodule(p.path)
    w = mod.weight.detach().index_select(p.weight_dim(), _idx(p, unit, mod.weight.device)).double()
    return w.t() if p.conv1d else w


def _set_o_matrix(block: nn.Module, layout: Layout, unit: int, w: torch.Tensor) -> None:
    p = _o_proj(layout)
    mod = block.get_submodule(p.path)
    w = w.t() if p.conv1d else w
    mod.weight.data.index_copy_(p.weight_dim(), _idx(p, unit, mod.weight.device), w.to(mod.weight.dtype))


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-1 of every attention projection's weight and bias (dtype included)."""
    layout = layout_of(model.config)
    return fingerprint((f"{i}.{p.path}.{name}", t) for i, block in enumerate(blocks(model))
                       for p in layout.projections()
                       for name, t in block.get_submodule(p.path).named_parameters(recurse=False))


def verify_fitted_weights(model: nn.Module, plan: SharePlan) -> None:
    """Refuse a plan made together with fitted weights on a model that does not hold those weights."""
    from .share import SharedProjection

    if plan.notes.get("requires_weights") != FITTED or any(isinstance(m, SharedProjection) for m in model.modules()):
        return  # nothing to check, or an already shared model that share() refuses anyway
    want = plan.notes.get("weights_sha1")
    if want is None or weights_fingerprint(model) != want:
        raise ValueError(
            f"this {plan.method!r} plan was made together with fitted attention weights (the o-projection "
            "columns of the units that stay), and this model does not hold them: applied to other weights it "
            f"would give a broken model. Fit and share in one go: `headshare share MODEL --method {plan.method} "
            "--ratio R --out DIR`, or in Python call share() on the model that make_plan() edited")


# -- calibration -----------------------------------------------------------------------------------------

@dataclass
class LayerData:
    """What one layer saw on calibration text in the original model."""

    h: torch.Tensor  # (B, T, D) block input
    block_call: tuple  # (args, kwargs) of the block call, hidden states left out
    attn_call: tuple  # (args, kwargs) of the attention call, hidden states included
    z: torch.Tensor  # (N, in) o-projection input: every head's attention output
    a: torch.Tensor  # (N, D) o-projection output: the layer's attention output
    w: torch.Tensor  # (N, 1) float64 token weights 1 / ||h + a||^2


def _replace_hidden(call: tuple, x: torch.Tensor | None) -> tuple:
    args, kwargs = call
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": x}
    return (x, *args[1:]), kwargs


def _run(module: nn.Module, call: tuple, x: torch.Tensor) -> torch.Tensor:
    args, kwargs = _replace_hidden(call, x)
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture(model: nn.Module, ids: torch.Tensor) -> list[LayerData]:
    """Run the original model once on `ids` (one batch) and keep every layer's inputs and outputs."""
    from .share import SharedProjection

    layout = layout_of(model.config)
    apath, o = attention_path(layout), _o_proj(layout)
    bl = blocks(model)
    if any(isinstance(m, SharedProjection) for m in model.modules()):
        raise ValueError("this model is already shared; calibrate on the original model")
    seen: dict[tuple[str, int], object] = {}

    def keep(kind, layer):
        def pre(_m, args, kwargs):
            seen[(kind, layer)] = (args, dict(kwargs))
        return pre

    def o_hook(layer):
        def fn(_m, args, out):
            seen[("o", layer)] = (args[0], out)
        return fn

    handles = []
    for i, b in enumerate(bl):
        handles.append(b.register_forward_pre_hook(keep("block", i), with_kwargs=True))
        handles.append(b.get_submodule(apath).register_forward_pre_hook(keep("attn", i), with_kwargs=True))
        handles.append(b.get_submodule(o.path).register_forward_hook(o_hook(i)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        model.base_model(input_ids=ids.to(device), use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    layers = []
    for i in range(len(bl)):
        bargs, bkw = seen[("block", i)]
        h = bkw["hidden_states"] if "hidden_states" in bkw else bargs[0]
        z, a = seen[("o", i)]
        z, a = z.reshape(-1, z.shape[-1]), a.reshape(-1, a.shape[-1])
        resid = h.reshape(-1, h.shape[-1]).double() + a.double()
        w = 1.0 / ((resid ** 2).sum(-1, keepdim=True) + 1e-12)
        layers.append(LayerData(h=h, block_call=_replace_hidden((bargs, bkw), None), attn_call=seen[("attn", i)],
                                z=z, a=a, w=w))
    return layers


def _unit_z(z: torch.Tensor, layout: Layout, unit: int) -> torch.Tensor:
    """(N, width) float64 slice of an o input belonging to `unit`."""
    return z[:, _idx(_o_proj(layout), unit, z.device)].double()


@torch.no_grad()
def borrowed_z(model: nn.Module, data: list[LayerData], layer: int, sources: list[tuple[int, int]]) -> dict:
    """{source: (N, width)} the heads' outputs that `source`'s q/k/v weights give on `layer`'s input.

    The sources are swapped into the slots of `layer`'s own units, as many at a time as it has units,
    and the layer's attention module is re-run on its captured input; the slots are restored after.
    """
    layout = layout_of(model.config)
    bl, apath = blocks(model), attention_path(layout)
    paths = [p.path for p in _in_proj(layout)]
    U = layout.units_per_layer
    block = bl[layer]
    saved = {u: _get_slices(block, layout, u) for u in range(U)}
    o = block.get_submodule(_o_proj(layout).path)
    got: dict = {}
    out = {}
    handle = o.register_forward_pre_hook(lambda _m, args: got.__setitem__("z", args[0]))
    try:
        for start in range(0, len(sources), U):
            chunk = sources[start:start + U]
            for slot, (sl, su) in enumerate(chunk):
                _set_slices(block, layout, slot, _get_slices(bl[sl], layout, su), paths)
            args, kwargs = data[layer].attn_call
            block.get_submodule(apath)(*args, **kwargs)
            z = got["z"].reshape(-1, got["z"].shape[-1])
            for slot, s in enumerate(chunk):
                out[s] = _unit_z(z, layout, slot)
    finally:
        handle.remove()
        for u in range(U):
            _set_slices(block, layout, u, saved[u])
    return out


# -- least squares ------------------------------------------------------------------------------------------

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
    source for borrowed ones, each with its o columns W (D, width). With a kept set K whose o columns are
    refitted, <a, b>_S = sum((W_a'W_b) * (G_ab - X_a'X_b)), G_ab = z_a'W z_b (W the token weights) and
    X = L^-1 G_K. for L the Cholesky factor of G_KK + lam: width x width work per pair once the Gram
    blocks exist (computed lazily in float32, accumulated per block, kept in float64).
    """

    def __init__(self, feats: dict, o_cols: dict, w: torch.Tensor):
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


def layer_options(gram: LayerGram, units: int, sources: list, rho: float, min_gain: float) -> dict:
    """{frozenset(removed units): (cost, {unit: ranked sources})} for one layer: for every subset of its units,
    the error per token left after the other units' o columns are refitted and every removed unit whose best
    source removes >= `min_gain` of its own leftover borrows it (scale fitted); the ranked (gain, source)
    lists let a later step fall back when a source turns out to be removed itself."""
    # each unit's shortlist: the sources best before any refit (cheap), then ranked again under each refit
    gram.set_kept([], rho)
    short = {u: [s for _, s, _ in gram.gains(("own", u), sources)[:SHORTLIST]] for u in range(units)}
    out = {}
    for k in range(1, units + 1):
        for removed in itertools.combinations(range(units), k):
            gram.set_kept([("own", u) for u in range(units) if u not in removed], rho)
            ranked = {u: [(g, s) for g, s, _ in gram.gains(("own", u), short[u])] for u in removed}
            lent = {u: r[0][1] for u, r in ranked.items() if r and r[0][0] >= min_gain}
            prune = gram.cost(list(removed), {})
            out[frozenset(removed)] = (gram.cost(list(removed), lent) if lent else prune, prune, ranked)
    return out


def _half(n: int, rows: int) -> int:
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


# -- the sequential refit -------------------------------------------------------------------------------

@torch.no_grad()
def refit(model: nn.Module, data: list[LayerData], removed: set, borrow: dict, rho: float = RHO,
          progress: bool = False, heldout: bool = True) -> dict:
    """Edit `model` in place: in every layer with removed units, the o columns of the units that stay are
    refitted so that the layer's attention output matches the original model's, and borrowed units get a
    fitted scale. Layers run in order on the *modified* model's own inputs, so each refit also absorbs
    what earlier layers changed. Borrowed units read their root's weights as `share` will (the root's own
    layer, earlier, was refitted first). Removed units' slices are restored at the end: only the o columns
    of units that stay differ from the original. Returns {(layer, unit): scale} for the units that borrow:
    a candidate whose borrowing does not lower the cross-fitted error (`heldout_lenders`) is pruned instead.
    """
    from tqdm.auto import tqdm

    layout = layout_of(model.config)
    U = layout.units_per_layer
    bl = blocks(model)
    o = _o_proj(layout)
    first = min((lay for lay, _ in removed), default=len(bl))
    original = {u: _get_slices(bl[u[0]], layout, u[1]) for u in removed}
    scales: dict = {}
    h = data[first].h if first < len(bl) else None
    try:
        for layer in tqdm(range(first, len(bl)), desc="refit", disable=not progress, unit="layer"):
            block = bl[layer]
            gone = [u for u in range(U) if (layer, u) in removed]
            handle = None
            if gone:
                for u in gone:
                    if (layer, u) in borrow:
                        sl, su = borrow[(layer, u)]
                        _set_slices(block, layout, u, _get_slices(bl[sl], layout, su))
                handle = block.get_submodule(o.path).register_forward_pre_hook(
                    _refit_hook(block, layout, layer, data[layer], gone, borrow, bl, rho, scales, heldout))
            try:
                h = _run(block, data[layer].block_call, h)
            finally:
                if handle is not None:
                    handle.remove()
    finally:
        for (layer, u), slices in original.items():
            _set_slices(bl[layer], layout, u, slices)
    return scales


def heldout_lenders(kz: torch.Tensor | None, v: torch.Tensor, w: torch.Tensor, ys: dict, rho: float,
                    split: int) -> list:
    """The subset of candidate borrowers (keys of `ys`, each with its borrowed output) whose fitted scales,
    fitted with the kept units' o refit (features `kz`) to the target `v` on one half of the tokens, leave
    the least error on the other half, both ways round. Ties go to fewer borrowers."""
    return heldout_lending(kz, v, w, ys, rho, split)[0]


def heldout_lending(kz: torch.Tensor | None, v: torch.Tensor, w: torch.Tensor, ys: dict, rho: float,
                    split: int) -> tuple[list, float]:
    """`heldout_lenders` and the cross-fitted error it leaves (summed over both halves)."""
    n = v.shape[0]
    folds = (slice(0, split), slice(split, n))
    best, best_err = [], math.inf
    cands = sorted(ys)
    for k in range(len(cands) + 1):
        for subset in itertools.combinations(cands, k):
            err = 0.0
            for fa, fb in (folds, folds[::-1]):
                fit = RidgeResidual(kz[fa] if kz is not None else None, w[fa], rho)
                a = fit_scales(fit, v[fa], [ys[u][fa] for u in subset]).tolist()
                rest = v[fa] - sum((s * ys[u][fa] for u, s in zip(subset, a, strict=True)), torch.zeros_like(v[fa]))
                res = v[fb] - sum((s * ys[u][fb] for u, s in zip(subset, a, strict=True)), torch.zeros_like(v[fb]))
                if kz is not None:
                    res = res - kz[fb] @ fit.solve(rest)
                err += float(((res ** 2) * w[fb]).sum())
            if err < best_err * (1 - 1e-9):
                best, best_err = list(subset), err
    return best, best_err


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
    split = _half(n, rows)
    out = {}
    for removed, (_, _, ranked) in options.items():
        kept = [u for u in range(U) if u not in removed]
        kz = torch.cat([z[u] for u in kept], 1) if kept else None
        v = sum(y[u] for u in removed)
        ys = {u: gram.z[r[0][1]].double() @ gram.o[r[0][1]].T for u, r in ranked.items()
              if r and r[0][0] >= min_gain}
        out[removed] = heldout_lending(kz, v, data.w, ys, rho, split)[1] / n
    return out


def _refit_hook(block, layout, layer, data, gone, borrow, bl, rho, scales, heldout=True) -> Callable:
    """A pre-hook on the o projection: sees this layer's heads' outputs on the modified model's input,
    fits, and writes the o columns before the projection runs (so the block's output already uses them)."""
    U = layout.units_per_layer

    def hook(_m, args):
        z = args[0].reshape(-1, args[0].shape[-1])
        target, w = data.a.double(), data.w
        bias = block.get_submodule(_o_proj(layout).path).bias
        if bias is not None:  # a per-layer constant that no unit owns: not part of the fit
            target = target - bias.detach().double()
        kept = [u for u in range(U) if u not in gone]
        zs = {u: _unit_z(z, layout, u) for u in range(U)}
        wk = {u: _o_matrix(block, layout, u) for u in kept}
        v = target - sum((zs[u] @ wk[u].T for u in kept), torch.zeros_like(target))
        kz = torch.cat([zs[u] for u in kept], 1) if kept else None
        fit = RidgeResidual(kz, w, rho)
        lent = [u for u in gone if (layer, u) in borrow]
        roots = {u: _o_matrix(bl[borrow[(layer, u)][0]], layout, borrow[(layer, u)][1]) for u in lent}
        ys = {u: zs[u] @ roots[u].T for u in lent}
        # a candidate borrows only if that lowers the cross-fitted error: an in-sample gain of a few
        # scalars is not enough (on SmolLM2 in-sample sharing made held-out perplexity worse than pruning)
        split = _half(z.shape[0], args[0].shape[0] if args[0].dim() == 3 else 1)
        if heldout:
            lent = heldout_lenders(kz, v, w, {u: ys[u] for u in lent}, rho, split)
        ys = [ys[u] for u in lent]
        a = fit_scales(fit, v, ys)
        for u, y, s in zip(lent, ys, a.tolist(), strict=True):
            v = v - s * y
            scales[(layer, u)] = s
            _set_o_matrix(block, layout, u, roots[u] * s)
        if kept:
            d = fit.solve(v)
            width = d.shape[0] // len(kept)
            for i, u in enumerate(kept):
                _set_o_matrix(block, layout, u, wk[u] + d[i * width:(i + 1) * width].T)
        for u in gone:
            if u not in lent:
                _set_o_matrix(block, layout, u, torch.zeros_like(_o_matrix(block, layout, u)))
    return hook


# -- symmetry-aligned weight similarity (data-free) -----------------------------------------------------------

_ROPE_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2")


def _head_weights(model, layout: Layout) -> tuple[torch.Tensor, ...]:
    """Per query head of every layer: q (L*H, d, D), its kv head's k and v (L*H, d, D), o (L*H, D, d)."""
    spec = arch_spec(layout.model_type)
    if layout.model_type not in _ROPE_TYPES or spec.q is None:
        raise UnsupportedModelError(f"aligned similarity needs separate q/k/v projections with RoPE; "
                                    f"{layout.model_type!r} has none")
    d, H, KV = layout.head_dim, layout.num_heads, layout.num_kv_heads
    kv_of = torch.arange(H) // (H // KV)
    qs, ks, vs, os_ = [], [], [], []
    for block in blocks(model):
        w = {name: block.get_submodule(getattr(spec, name)).weight.detach().float() for name in "qkvo"}
        qs.append(w["q"].view(H, d, -1))
        ks.append(w["k"].view(KV, d, -1)[kv_of])
        vs.append(w["v"].view(KV, d, -1)[kv_of])
        os_.append(w["o"].view(w["o"].shape[0], H, d).permute(1, 0, 2))
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), torch.cat(os_)


def aligned_similarity(model, sketch: int = 256, seed: int = 0) -> torch.Tensor:
    """(N, N) unit similarity that the exact symmetries of attention leave unchanged, from weights alone.

    Raw weight cosines change under transformations that leave the function unchanged; this compares the
    invariants instead, per query head:
    - QK: with RoPE, the logit of a query/key pair is sum_i cos(.) q_i'k_i + sin(.) q_i'J k_i over the
      frequency pairs i (dims i and i + d/2), so the bilinear forms A_i = W_q,i'W_k,i and C_i = W_q,i'J W_k,i
      are the whole function; any rotation (and opposite scaling of q and k) within a pair leaves them alone.
      <A_i, A'_i> and <C_i, C'_i> come from 2 x 2 products.
    - OV: W_o W_v (D x D) is unchanged by W_v -> B W_v, W_o -> W_o B^-1 for any invertible B; compared through
      a seeded Gaussian sketch (W_o W_v S, `sketch` columns), an unbiased estimate of the inner products.
    A head pair scores the mean of its QK and OV cosines; a unit pair the best matching of their query heads
    (permuting a unit's query heads with their o columns is one more symmetry). Unit index = layer*U + unit.
    """
    layout = layout_of(model.config)
    d, g = layout.head_dim, layout.q_heads_per_unit
    q, k, v, o = _head_weights(model, layout)
    n = q.shape[0]
    perm = torch.arange(d).view(2, d // 2).T.reshape(-1)  # pair i = dims (i, i + d/2), adjacent
    qp, kp = q[:, perm].view(n, d // 2, 2, -1), k[:, perm].view(n, d // 2, 2, -1)
    qk = torch.empty(n, n)
    for a in range(0, n, 32):  # chunks keep the (chunk, n, d/2, 2, 2) products small
        pq = torch.einsum("aipx,biqx->abipq", qp[a:a + 32], qp)
        pk = torch.einsum("aipx,biqx->abipq", kp[a:a + 32], kp)
        same = (pq * pk).sum((-1, -2))
        turn = pq[..., 1, 1] * pk[..., 0, 0] - pq[..., 1, 0] * pk[..., 0, 1] \
            - pq[..., 0, 1] * pk[..., 1, 0] + pq[..., 0, 0] * pk[..., 1, 1]
        qk[a:a + 32] = (same + turn).sum(-1)
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(q.shape[-1], sketch, generator=gen) / sketch ** 0.5
    ov = torch.einsum("hDd,hdx->hDx", o, v @ s).reshape(n, -1)  # (heads, D * sketch)
    ov = ov @ ov.T

    def cos(m):
        norm = m.diagonal().clamp_min(1e-30).sqrt()
        return m / norm[:, None] / norm[None, :]

    heads = (cos(qk) + cos(ov)) / 2  # (L*H, L*H)
    if layout.multi_query:
        return heads
    h = heads.view(layout.units_total, g, layout.units_total, g).permute(0, 2, 1, 3)  # (N, N, g, g)
    best = None
    for p in itertools.permutations(range(g)):
        score = h[:, :, torch.arange(g), torch.tensor(p)].mean(-1)
        best = score if best is None else torch.maximum(best, score)
    return best


@register_method("alignshare", "DirectShare with a symmetry-aligned weight similarity (data-free, copies)")
def alignshare(model, ratio: float, progress: bool = False, **_) -> SharePlan:
    """The paper's dynamic selection and copy, matched by `aligned_similarity` instead of raw weight cosine."""
    from .plan import dynamic_selection

    layout = layout_of(model.config)
    units_for_ratio(ratio, layout)
    sim = aligned_similarity(model)
    return new_plan(model, "alignshare", ratio, metric="aligned-qk+ov",
                    assignments=dynamic_selection(sim, layout, ratio),
                    notes={"similarity": "mean of QK (RoPE-pair invariant) and OV (sketched) cosines, best head "
                                         "matching"})


# -- the methods ---------------------------------------------------------------------------------------------

def _setup(model, ratio, tokenizer, calib, calib_tokens, progress):
    layout = layout_of(model.config)
    n = units_for_ratio(ratio, layout)
    calib = calib or "builtin:calib"
    calib_tokens = calib_tokens or CALIB_TOKENS
    ids = calibration_ids(model, tokenizer, calib, calib_tokens) if n else None
    return layout, n, calib, calib_tokens, ids


def _layer_gram(model, data: list[LayerData], layout: Layout, layer: int, sources: list) -> LayerGram:
    """The layer's own units and the given sources (run on this layer's input) as a `LayerGram`."""
    bl, d = blocks(model), data[layer]
    feats = {("own", u): _unit_z(d.z, layout, u) for u in range(layout.units_per_layer)}
    cols = {("own", u): _o_matrix(bl[layer], layout, u) for u in range(layout.units_per_layer)}
    for s, z in (borrowed_z(model, data, layer, sources) if sources else {}).items():
        feats[s], cols[s] = z, _o_matrix(bl[s[0]], layout, s[1])
    return LayerGram(feats, cols, d.w)


def _sources(layer: int, U: int, window: int | None, removed) -> list[tuple[int, int]]:
    lo = 0 if window is None else max(0, layer - window)
    return [(sl, su) for sl in range(lo, layer) for su in range(U) if (sl, su) not in removed]


@register_method("actshare", "activation-aware pairs + fitted output scale (calibration text; no weight edits)")
def actshare(model, ratio: float, tokenizer=None, calib: str | None = None, calib_tokens: int | None = None,
             window: int | None = WINDOW, progress: bool = False, **_) -> SharePlan:
    """Each unit of layers >= 1 borrows the earlier unit (within `window` layers) whose weights, run on the
    unit's own layer input, best reproduce its output after a least-squares scale; the units where that
    leaves the least weighted error borrow. Sources are never themselves removed."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    layout, n, calib, calib_tokens, ids = _setup(model, ratio, tokenizer, calib, calib_tokens, progress)
    notes = {"calib": calib, "calib_tokens": calib_tokens, "window": window,
             "score": "weighted error left after the fitted scale, relative to pruning the unit (1 = no better)"}
    if n == 0:
        return new_plan(model, "actshare", ratio, notes=notes)
    data = capture(model, ids)
    U, bl = layout.units_per_layer, blocks(model)
    options: dict[tuple[int, int], list] = {}  # unit -> [(cost, source, scale)] best first, and prune cost
    prune_cost: dict[tuple[int, int], float] = {}
    for layer in tqdm(range(1, layout.num_layers), desc="actshare", disable=not progress, unit="layer"):
        gram = _layer_gram(model, data, layout, layer, _sources(layer, U, window, ()))
        gram.set_kept([], 0.0)
        sources = [k for k in gram.z if k[0] != "own"]
        for u in range(U):
            p = gram.inner(("own", u), ("own", u)) / gram.n
            prune_cost[(layer, u)] = p
            options[(layer, u)] = [(p * (1 - g), s, a) for g, s, a in gram.gains(("own", u), sources)]
    chosen: dict[tuple[int, int], tuple] = {}  # borrowing unit -> (cost, source, scale)
    for unit in sorted(options, key=lambda u: (options[u][0][0] if options[u] else math.inf, u)):
        if len(chosen) == n:
            break
        gone = set(chosen) | {unit}
        # units that borrow from this one move to their next best source, or this one stays
        moved = {v: next((o for o in options[v] if o[1] not in gone), None) for v, c in chosen.items() if c[1] == unit}
        own = next((o for o in options[unit] if o[1] not in gone), None)
        if own is None or any(o is None for o in moved.values()):
            continue
        chosen.update(moved)
        chosen[unit] = own
    if len(chosen) < n:
        raise ValueError(f"actshare found only {len(chosen)} of {n} units with a source; lower the ratio "
                         "or widen the window")
    assignments = [Assignment(u[0], u[1], src[0], src[1], score=round(cost / prune_cost[u], 6) if prune_cost[u] > 0
                              else 1.0, scale=scale) for u, (cost, src, scale) in chosen.items()]
    assignments.sort(key=lambda a: (a.layer, a.unit))
    # scales fitted jointly per layer: then the layer's error is never above pruning the same units (a = 0)
    for layer in sorted({a.layer for a in assignments}):
        mine = [a for a in assignments if a.layer == layer]
        d, fit = data[layer], RidgeResidual(None, data[layer].w, 0.0)
        zb = borrowed_z(model, data, layer, [(a.source_layer, a.source_unit) for a in mine])
        v = sum(_unit_z(d.z, layout, a.unit) @ _o_matrix(bl[layer], layout, a.unit).T for a in mine)
        ys = [zb[(a.source_layer, a.source_unit)] @ _o_matrix(bl[a.source_layer], layout, a.source_unit).T
              for a in mine]
        for a, scale in zip(mine, fit_scales(fit, v, ys).tolist(), strict=True):
            a.scale = scale
    notes["seconds"] = round(time.perf_counter() - t0, 1)
    return new_plan(model, "actshare", ratio, assignments=assignments, notes=notes)


def _fit_plan(model, method: str, ratio: float, tokenizer, calib, calib_tokens, rho: float, window: int | None,
              min_gain: float, progress: bool, heldout: bool = True, select: str = "heldout") -> SharePlan:
    """fitshare / fitprune: knapsack selection, source choice, sequential refit (edits `model`)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    layout, n, calib, calib_tokens, ids = _setup(model, ratio, tokenizer, calib, calib_tokens, progress)
    notes = {"calib": calib, "calib_tokens": calib_tokens, "rho": rho, "window": window, "min_gain": min_gain,
             "heldout_lenders": heldout, "select": select}
    if n == 0:
        return new_plan(model, method, ratio, notes=notes)
    data = capture(model, ids)
    U, share = layout.units_per_layer, math.isfinite(min_gain)
    options, costs = [], []
    for layer in tqdm(range(layout.num_layers), desc="costs", disable=not progress, unit="layer"):
        sources = _sources(layer, U, window, ()) if share else []
        gram = _layer_gram(model, data, layout, layer, sources)
        options.append(layer_options(gram, U, sources, rho, min_gain))
        if share and select == "heldout":
            costs.append(heldout_share_costs(gram, options[-1], data[layer], layout, rho, len(ids), min_gain))
            continue
        # the cross-fitted pruning error: no candidate lends (min_gain infinite)
        held = heldout_share_costs(gram, options[-1], data[layer], layout, rho, len(ids), math.inf)
        # select="sharing": the in-sample gain of sharing scales the held-out pruning cost (it moves the choice
        # towards units with a good source: better at 50 % on SmolLM2, worse at 10-30 %, see BENCHMARKS.md);
        # "pruning": the held-out pruning cost alone
        costs.append({r: held[r] * (c / p if p > 0 and select == "sharing" else 1.0)
                      for r, (c, p, _) in options[-1].items()})
    removed = set(knapsack(costs, n))
    borrow: dict = {}
    gains: dict = {}
    for layer in range(layout.num_layers):
        gone = frozenset(u for u in range(U) if (layer, u) in removed)
        if not gone:
            continue
        ranked = options[layer][gone][2]
        for u in sorted(gone):
            # the knapsack assumed sources stay; one that was removed after all gives way to the next best
            pick = next(((g, s) for g, s in ranked.get(u, []) if s not in removed), None)
            if pick is not None and pick[0] >= min_gain:
                borrow[(layer, u)], gains[(layer, u)] = pick[1], pick[0]
    t1 = time.perf_counter()
    scales = refit(model, data, removed, borrow, rho, progress, heldout)
    borrow = {u: src for u, src in borrow.items() if u in scales}  # the others did not pay off held out
    assignments = [Assignment(layer, u, *borrow[(layer, u)], score=round(gains[(layer, u)], 6),
                              scale=scales[(layer, u)]) for layer, u in sorted(borrow)]
    pruned = sorted(u for u in removed if u not in borrow)
    notes.update(requires_weights=FITTED, weights_sha1=weights_fingerprint(model),
                 fitted="o-projection columns of the units that stay in layers with removed units",
                 score="share of the refit's leftover error that borrowing removes",
                 cost=round(sum(costs[layer][frozenset(u for lay, u in removed if lay == layer)]
                                for layer in {lay for lay, _ in removed}), 9),
                 select_seconds=round(t1 - t0, 1), refit_seconds=round(time.perf_counter() - t1, 1))
    return new_plan(model, method, ratio, assignments=assignments, pruned=pruned, notes=notes)


@register_method("fitshare", "share or prune per unit under one budget, refit the o columns that stay "
                             "(calibration text; edits the model's weights)")
def fitshare(model, ratio: float, tokenizer=None, calib: str | None = None, calib_tokens: int | None = None,
             rho: float = RHO, window: int | None = WINDOW, min_gain: float = MIN_GAIN, progress: bool = False,
             heldout: bool = True, select: str = "heldout", **_) -> SharePlan:
    """Units chosen per layer subset with a knapsack over layers on the cross-fitted error left after
    refitting the units that stay (`select="sharing"`: that error scaled by what sharing would remove); a
    removed unit is a candidate to borrow its best earlier source when that removes >= `min_gain` of the
    remaining error; then the sequential refit (`refit`), where a candidate keeps its source only if that
    lowers the cross-fitted error (`heldout=False`: always), else it is pruned. Edits `model` in place:
    apply the plan to this same model."""
    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, got {select!r}")
    return _fit_plan(model, "fitshare", ratio, tokenizer, calib, calib_tokens, rho, window, min_gain, progress,
                     heldout, select)


@register_method("fitprune", "fitshare without sharing: prune per layer subset, refit the o columns that stay "
                             "(calibration text; edits the model's weights)")
def fitprune(model, ratio: float, tokenizer=None, calib: str | None = None, calib_tokens: int | None = None,
             rho: float = RHO, progress: bool = False, **_) -> SharePlan:
    """The same selection and refit as `fitshare`, every removed unit pruned: what sharing adds is the gap."""
    return _fit_plan(model, "fitprune", ratio, tokenizer, calib, calib_tokens, rho, None, math.inf, progress)
