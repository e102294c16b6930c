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

import hashlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .arch import Layout, ProjSpec, UnsupportedModelError, arch_spec, blocks, layout_of
from .plan import Assignment, SharePlan, new_plan, register_method, units_for_ratio

CALIB_TOKENS = 2048  # 4 windows of 512: the fits below generalise from this (see BENCHMARKS.md)
BLOCK_SIZE = 512
RHO = 1e-2  # ridge, relative to the mean diagonal of the Gram matrix; 1e-3 generalised worse
WINDOW = 6  # sources are searched in this many preceding layers (the best ones were 1-5 layers back)
MIN_GAIN = 0.01  # fitshare shares a unit only if borrowing removes >= 1 % of what the refit leaves
FITTED = "method-fitted"


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
    h = hashlib.sha1()
    for block in blocks(model):
        for p in layout.projections():
            mod = block.get_submodule(p.path)
            for t in (mod.weight, mod.bias):
                if t is not None:
                    t = t.detach().contiguous().cpu()
                    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                    h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


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


def calibration_ids(model, tokenizer, calib: str, calib_tokens: int, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """(n, block) token ids: the first `calib_tokens` tokens of the calibration text."""
    from .data import load_text, tokenize

    if tokenizer is None:
        raise ValueError("this method needs a tokenizer for its calibration text (pass tokenizer=...)")
    max_pos = getattr(model.config, "max_position_embeddings", None) or block_size
    block = max(2, min(block_size, max_pos, calib_tokens))
    ids = tokenize(tokenizer, load_text(calib, split="calib"), bos=False)[:calib_tokens]
    if len(ids) < 2:
        raise ValueError(f"calibration text {calib!r} has fewer than 2 tokens")
    if len(ids) < block:
        return ids[None]
    n = len(ids) // block
    return ids[: n * block].view(n, block)


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


@dataclass
class Factored:
    """A unit's output y = z @ wt without forming it: (N, width) heads' outputs times (width, D) o columns,
    with the refit's projections of y cached (inner products then cost width^2, not N x D)."""

    z: torch.Tensor
    wt: torch.Tensor
    zw: torch.Tensor  # z * token weights
    p: torch.Tensor | None = None  # Z'W y
    s: torch.Tensor | None = None  # (Z'WZ + lam)^-1 Z'W y
    norm: float | None = None  # <y, y>_S, once computed


def factored(fit: RidgeResidual, z: torch.Tensor, w_o: torch.Tensor) -> Factored:
    """`Factored` for y = z @ w_o.T under `fit` (w_o: (D, width) o columns)."""
    f = Factored(z, w_o.T, z * fit.w)
    if fit.z is not None:
        f.p = (fit.z.T @ f.zw) @ f.wt
        f.s = torch.cholesky_solve(f.p, fit.chol)
    return f


def factored_inner(fit: RidgeResidual, a: Factored, b: Factored) -> float:
    """fit.inner(a.z @ a.wt, b.z @ b.wt) from width x width products."""
    if a is b and a.norm is not None:
        return a.norm
    val = ((a.wt @ b.wt.T) * (a.z.T @ b.zw)).sum()
    if a.p is not None:
        val = val - (a.p * b.s).sum()
    if a is b:
        a.norm = float(val)
    return float(val)


def best_source(fit: RidgeResidual, unit: Factored, cands: dict) -> list[tuple[float, tuple, float]]:
    """[(share of <y, y>_S removed, source, scale)] for every candidate {source: Factored}, best first."""
    yy = factored_inner(fit, unit, unit)
    out = []
    for s, c in cands.items():
        cc, cy = factored_inner(fit, c, c), factored_inner(fit, c, unit)
        a = cy / cc if cc > 0 else 0.0
        out.append((a * cy / yy if yy > 0 else 0.0, s, a))
    return sorted(out, key=lambda t: (-t[0], t[1]))


def fit_scales(fit: RidgeResidual, v: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
    """Scales a minimising min_D ||v - sum a_i y_i - Z D||_w^2 + lam||D||^2 (ridge only on D)."""
    if not ys:
        return torch.zeros(0, dtype=torch.float64)
    m = torch.tensor([[fit.inner(a, b) for b in ys] for a in ys], dtype=torch.float64)
    r = torch.tensor([fit.inner(a, v) for a in ys], dtype=torch.float64)
    m = m + 1e-12 * m.diagonal().abs().max().clamp_min(1e-30) * torch.eye(len(ys), dtype=torch.float64)
    return torch.linalg.solve(m, r)


def subset_costs(data: LayerData, o_cols: list[torch.Tensor], layout: Layout, rho: float) -> dict:
    """{frozenset(removed units): cost} for one layer: the weighted error per token that remains after
    the other units' o columns are refitted (ridge) to give the layer's output without them."""
    U = layout.units_per_layer
    z = torch.cat([_unit_z(data.z, layout, u) for u in range(U)], 1)
    gram = z.T @ (z * data.w)
    width = z.shape[1] // U
    wt = torch.cat([w.T for w in o_cols], 0)  # (U * width, D)
    cols = [torch.arange(u * width, (u + 1) * width) for u in range(U)]
    n = z.shape[0]
    out = {}
    for k in range(1, U + 1):
        for removed in itertools.combinations(range(U), k):
            kept = [u for u in range(U) if u not in removed]
            ir = torch.cat([cols[u] for u in removed])
            wr = wt[ir]
            cost = (wr * (gram[ir][:, ir] @ wr)).sum()
            if kept:
                ik = torch.cat([cols[u] for u in kept])
                gk = gram[ik][:, ik]
                gk = gk + rho * gk.diagonal().mean() * torch.eye(len(ik), dtype=gk.dtype)
                b = gram[ik][:, ir] @ wr
                cost = cost - (b * torch.linalg.solve(gk, b)).sum()
            out[frozenset(removed)] = float(cost) / n
    return out


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
          progress: bool = False) -> dict:
    """Edit `model` in place: in every layer with removed units, the o columns of the units that stay are
    refitted so that the layer's attention output matches the original model's, and borrowed units get a
    fitted scale. Layers run in order on the *modified* model's own inputs, so each refit also absorbs
    what earlier layers changed. Borrowed units read their root's weights as `share` will (the root's own
    layer, earlier, was refitted first). Removed units' slices are restored at the end: only the o columns
    of units that stay differ from the original. Returns {(layer, unit): scale} for borrowed units.
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
                    _refit_hook(block, layout, layer, data[layer], gone, borrow, bl, rho, scales))
            try:
                h = _run(block, data[layer].block_call, h)
            finally:
                if handle is not None:
                    handle.remove()
    finally:
        for (layer, u), slices in original.items():
            _set_slices(bl[layer], layout, u, slices)
    return scales


def _refit_hook(block, layout, layer, data, gone, borrow, bl, rho, scales) -> Callable:
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
        fit = RidgeResidual(torch.cat([zs[u] for u in kept], 1) if kept else None, w, rho)
        lent = [u for u in gone if (layer, u) in borrow]
        roots = {u: _o_matrix(bl[borrow[(layer, u)][0]], layout, borrow[(layer, u)][1]) for u in lent}
        ys = [zs[u] @ roots[u].T for u in lent]
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


# -- the methods ---------------------------------------------------------------------------------------------

def _setup(model, ratio, tokenizer, calib, calib_tokens, progress):
    layout = layout_of(model.config)
    n = units_for_ratio(ratio, layout)
    calib = calib or "builtin:calib"
    calib_tokens = calib_tokens or CALIB_TOKENS
    ids = calibration_ids(model, tokenizer, calib, calib_tokens) if n else None
    return layout, n, calib, calib_tokens, ids


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
        d = data[layer]
        fit = RidgeResidual(None, d.w, 0.0)
        cands = {s: factored(fit, z, _o_matrix(bl[s[0]], layout, s[1]))
                 for s, z in borrowed_z(model, data, layer, _sources(layer, U, window, ())).items()}
        for u in range(U):
            y = factored(fit, _unit_z(d.z, layout, u), _o_matrix(bl[layer], layout, u))
            p = factored_inner(fit, y, y) / d.z.shape[0]
            prune_cost[(layer, u)] = p
            options[(layer, u)] = [(p * (1 - g), s, a) for g, s, a in best_source(fit, y, cands)]
    removed: set = set()
    assignments = []
    sources_used: set = set()
    queue = sorted(options, key=lambda u: (options[u][0][0], u))
    for unit in queue:
        if len(assignments) == n:
            break
        if unit in sources_used:
            continue  # something already borrows it: it stays
        choice = next((o for o in options[unit] if o[1] not in removed), None)
        if choice is None:
            continue
        cost, src, scale = choice
        removed.add(unit)
        sources_used.add(src)
        rel = cost / prune_cost[unit] if prune_cost[unit] > 0 else 1.0
        assignments.append(Assignment(unit[0], unit[1], src[0], src[1], score=round(rel, 6), scale=scale))
    if len(assignments) < n:
        raise ValueError(f"actshare found only {len(assignments)} of {n} units with a source; lower the ratio "
                         "or widen the window")
    assignments.sort(key=lambda a: (a.layer, a.unit))
    notes["seconds"] = round(time.perf_counter() - t0, 1)
    return new_plan(model, "actshare", ratio, assignments=assignments, notes=notes)


def _fit_plan(model, method: str, ratio: float, tokenizer, calib, calib_tokens, rho: float, window: int | None,
              min_gain: float, progress: bool) -> SharePlan:
    """fitshare / fitprune: knapsack selection, source choice, sequential refit (edits `model`)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    layout, n, calib, calib_tokens, ids = _setup(model, ratio, tokenizer, calib, calib_tokens, progress)
    notes = {"calib": calib, "calib_tokens": calib_tokens, "rho": rho, "window": window, "min_gain": min_gain}
    if n == 0:
        return new_plan(model, method, ratio, notes=notes)
    data = capture(model, ids)
    U, bl = layout.units_per_layer, blocks(model)
    costs = [subset_costs(data[layer], [_o_matrix(bl[layer], layout, u) for u in range(U)], layout, rho)
             for layer in tqdm(range(layout.num_layers), desc="costs", disable=not progress, unit="layer")]
    removed = set(knapsack(costs, n))
    borrow: dict = {}
    gains: dict = {}
    if math.isfinite(min_gain):
        for layer in tqdm(range(1, layout.num_layers), desc="sources", disable=not progress, unit="layer"):
            gone = [u for u in range(U) if (layer, u) in removed]
            if not gone:
                continue
            d = data[layer]
            kept = [u for u in range(U) if u not in gone]
            fit = RidgeResidual(torch.cat([_unit_z(d.z, layout, u) for u in kept], 1) if kept else None, d.w, rho)
            cands = {s: factored(fit, z, _o_matrix(bl[s[0]], layout, s[1]))
                     for s, z in borrowed_z(model, data, layer, _sources(layer, U, window, removed)).items()}
            for u in gone:
                y = factored(fit, _unit_z(d.z, layout, u), _o_matrix(bl[layer], layout, u))
                ranked = best_source(fit, y, cands)
                if ranked and ranked[0][0] >= min_gain:
                    borrow[(layer, u)], gains[(layer, u)] = ranked[0][1], ranked[0][0]
    t1 = time.perf_counter()
    scales = refit(model, data, removed, borrow, rho, progress)
    assignments = [Assignment(layer, u, *borrow[(layer, u)], score=round(gains[(layer, u)], 6),
                              scale=scales[(layer, u)]) for layer, u in sorted(borrow)]
    pruned = sorted(u for u in removed if u not in borrow)
    notes.update(requires_weights=FITTED, weights_sha1=weights_fingerprint(model),
                 fitted="o-projection columns of the units that stay in layers with removed units",
                 score="share of the refit's leftover error that borrowing removes",
                 cost=round(sum(costs[layer][frozenset(u for lay, u in removed if lay == layer)]
                                for layer in {lay for lay, _ in removed}), 6),
                 select_seconds=round(t1 - t0, 1), refit_seconds=round(time.perf_counter() - t1, 1))
    return new_plan(model, method, ratio, assignments=assignments, pruned=pruned, notes=notes)


@register_method("fitshare", "share or prune per unit under one budget, refit the o columns that stay "
                             "(calibration text; edits the model's weights)")
def fitshare(model, ratio: float, tokenizer=None, calib: str | None = None, calib_tokens: int | None = None,
             rho: float = RHO, window: int | None = WINDOW, min_gain: float = MIN_GAIN, progress: bool = False,
             **_) -> SharePlan:
    """Units chosen per layer subset with a knapsack over layers on the error left after refitting the units
    that stay; a removed unit borrows its best earlier source when that removes >= `min_gain` of the
    remaining error, else it is pruned; then the sequential refit (`refit`). Edits `model` in place: apply
    the plan to this same model."""
    return _fit_plan(model, "fitshare", ratio, tokenizer, calib, calib_tokens, rho, window, min_gain, progress)


@register_method("fitprune", "fitshare without sharing: prune per layer subset, refit the o columns that stay "
                             "(calibration text; edits the model's weights)")
def fitprune(model, ratio: float, tokenizer=None, calib: str | None = None, calib_tokens: int | None = None,
             rho: float = RHO, progress: bool = False, **_) -> SharePlan:
    """The same selection and refit as `fitshare`, every removed unit pruned: what sharing adds is the gap."""
    return _fit_plan(model, "fitprune", ratio, tokenizer, calib, calib_tokens, rho, None, math.inf, progress)
