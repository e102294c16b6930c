"""`actshare`: activation-aware matching with a fitted output scale, no weight edits.

Unit u may borrow source s at cost ||y_u - a * y_s->u||^2, the change in u's layer output on calibration
text, with y_s->u the output of s's weights run on u's own layer input and `a` the least-squares scale
(`Assignment.scale`). The cheapest units borrow. a = 0 would be pruning, so on the same units this is
never worse than pruning them (on calibration). Errors weigh token t by 1 / ||h_t + a_t||^2.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..arch import blocks, layout_of
from ..config import check
from ..errors import HeadshareError
from ..plan import Assignment, SharePlan, new_plan, units_for_ratio
from ..units import o_columns, unit_z
from .base import CalibConfig, register_method
from .calibration import (
    WINDOW,
    borrowed_z,
    calibration_ids,
    candidate_sources,
    layer_gram,
    source_key,
    walk,
    window_ok,
)
from .lstsq import RidgeResidual, fit_scales


@dataclass
class ActShareConfig(CalibConfig):
    window: int | None = WINDOW  # None: search every earlier layer

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "window", window_ok(self.window), "an integer >= 1 or none")


@register_method("actshare", ActShareConfig, "activation-aware pairs + fitted output scale (calibration text; "
                                             "no weight edits)", needs_tokenizer=True)
def actshare(model, cfg: ActShareConfig, tokenizer=None, progress: bool = False, device=None) -> SharePlan:
    """Each unit of layers >= 1 borrows the earlier unit (within `window` layers) whose weights, run on the
    unit's own layer input, best reproduce its output after a least-squares scale; the units where that
    leaves the least weighted error borrow. Sources are never themselves removed."""
    t0 = time.perf_counter()
    layout = layout_of(model.config, cfg.unit)
    n, window = units_for_ratio(cfg.ratio, layout), cfg.window
    notes = {"score": "weighted error left after the fitted scale, relative to pruning the unit (1 = no better)"}
    if n == 0:
        return new_plan(model, "actshare", cfg.ratio, unit_kind=cfg.unit, notes=notes)
    ids = calibration_ids(model, tokenizer, cfg.calib, cfg.calib_tokens)
    U, bl = layout.units_per_layer, blocks(model)
    options: dict[tuple[int, int], list] = {}  # unit -> [(cost, source, scale)] best first, and prune cost
    prune_cost: dict[tuple[int, int], float] = {}
    for layer, d in walk(model, ids, device, progress, desc="actshare"):
        if layer == 0:  # layer 0 has no earlier unit to borrow
            continue
        gram = layer_gram(model, d, layout, layer, candidate_sources(layer, U, window, ()))
        gram.set_kept([], 0.0)
        sources = candidate_sources(layer, U, window, ())
        for u in range(U):
            p = gram.inner(("own", u), ("own", u)) / gram.n
            prune_cost[(layer, u)] = p
            options[(layer, u)] = [(p * (1 - g), s[:2], a)
                                   for g, s, a in gram.gains(("own", u), [gram.key(x, u) for x in sources])]
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
        raise HeadshareError(f"actshare found only {len(chosen)} of {n} units with a source; lower the ratio "
                         "or widen the window")
    assignments = [Assignment(u[0], u[1], src[0], src[1], score=round(cost / prune_cost[u], 6) if prune_cost[u] > 0
                              else 1.0, scale=scale) for u, (cost, src, scale) in chosen.items()]
    assignments.sort(key=lambda a: (a.layer, a.unit))
    # scales fitted jointly per layer: then the layer's error is never above pruning the same units (a = 0)
    layers = {a.layer for a in assignments}
    for layer, d in walk(model, ids, device, progress, desc="scales"):
        if layer > max(layers):
            break
        if layer not in layers:
            continue
        mine = [a for a in assignments if a.layer == layer]
        fit = RidgeResidual(None, d.w, 0.0)
        keys = [source_key(layout, (a.source_layer, a.source_unit), a.unit) for a in mine]
        zb = borrowed_z(model, d, layout, layer, list(dict.fromkeys(keys)))
        v = sum(unit_z(d.z, layout, a.unit) @ o_columns(bl[layer], layout, a.unit).T for a in mine)
        ys = [zb[k] @ o_columns(bl[a.source_layer], layout, a.source_unit).to(d.z.device).T
              for a, k in zip(mine, keys, strict=True)]
        for a, scale in zip(mine, fit_scales(fit, v, ys).tolist(), strict=True):
            a.scale = scale
    notes["seconds"] = round(time.perf_counter() - t0, 1)
    return new_plan(model, "actshare", cfg.ratio, unit_kind=cfg.unit, assignments=assignments, notes=notes)


