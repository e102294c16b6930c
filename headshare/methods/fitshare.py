"""`fitshare` and `fitprune`: choose the units to remove jointly per layer, borrow where a held-out check
says it helps, and refit the o columns of the units that stay by least squares.

- `fitshare` (combination under one budget): which units go is chosen jointly per layer (every subset of
  a layer's units, then a knapsack over layers) on the cross-fitted error left after refitting the units
  that stay; each removed unit borrows its best source or is pruned; then the o-projection columns of the
  units that stay in those layers are refitted by ridge least squares so that the layer's attention output
  stays what it was, layer after layer on the modified model's own inputs.
- `fitprune`: `fitshare` without sharing; the ablation that shows what sharing itself adds.

The refitted columns are the plan's fitted weights (`SharePlan.fitted`, with the fingerprint of the
weights they were fitted on); `headshare.share` writes them before tying the units.

Every error is measured in units of the residual stream the output is added to: token t weighs
1 / ||h_t + a_t||^2 (h the block input, a the attention output). Raw output energy, the `prune`
baseline's importance, is blind to the residual norm growing with depth.

    >>> plan = headshare.make_plan(model, FitShareConfig(ratio=0.3), tokenizer=tok)   # doctest: +SKIP
    >>> headshare.share(model, plan)                                                  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from ..arch import layout_of
from ..config import check, is_number
from ..plan import Assignment, SharePlan, new_plan, units_for_ratio
from ..units import (
    weights_fingerprint,
)
from .base import CalibConfig, register_method
from .calibration import WINDOW, calibration_ids, candidate_sources, layer_gram, walk, window_ok
from .lstsq import (
    candidate_subsets,
    heldout_prune_costs,
    heldout_share_costs,
    knapsack,
    layer_options,
)
from .refit import RHO, RIDGES, refit, ridges_note

MIN_GAIN = 0.01  # fitshare shares a unit only if borrowing removes >= 1 % of what the refit leaves

_SHARED: ContextVar[dict | None] = ContextVar("headshare_pruning_costs", default=None)


@contextmanager
def shared_pruning_costs():
    """Inside, `pruning_costs` of the same layer, units, ridge and calibration data are computed once: autoshare's
    candidates fitprune and basisshare weigh the same costs on the same model, which nothing changes meanwhile."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def pruning_costs(model, d, layout, layer: int, rho: float, n_seqs: int) -> dict:
    """{subset of the layer's units: cross-fitted error per token left after pruning it and refitting o} over the
    greedy's candidate subsets: fitprune's selection and basisshare's fixed split both weigh these."""
    memo, key = _SHARED.get(), None
    if memo is not None:  # the o inputs' first moments stand in for the calibration text (the model is fixed)
        z = d.z.float()
        key = (layer, layout.unit_kind, rho, n_seqs, tuple(z.shape), float(z.sum()), float(z.square().sum()))
        if key in memo:
            return dict(memo[key])
    gram = layer_gram(model, d, layout, layer, [])
    subsets = [frozenset(c) for c in candidate_subsets(gram, layout.units_per_layer, rho)]
    out = heldout_prune_costs(gram, subsets, d, layout, rho, n_seqs)
    if memo is not None:
        memo[key] = dict(out)
    return out


def _fit_plan(model, method: str, cfg: CalibConfig, tokenizer, rho: float, window: int | None,
              min_gain: float, progress: bool, heldout: bool = True, device=None) -> SharePlan:
    """fitshare / fitprune: knapsack selection, source choice, sequential refit (fitted o columns in the plan)."""
    t0 = time.perf_counter()
    layout = layout_of(model.config, cfg.unit)
    n = units_for_ratio(cfg.ratio, layout)
    if n == 0:
        return new_plan(model, method, cfg.ratio, unit_kind=cfg.unit)
    ids = calibration_ids(model, tokenizer, cfg.calib, cfg.calib_tokens)
    base = weights_fingerprint(model, cfg.unit)
    U, share = layout.units_per_layer, math.isfinite(min_gain)
    options, costs = [], []
    for layer, d in walk(model, ids, device, progress, desc="costs"):
        if share:
            sources = candidate_sources(layer, U, window, ())
            gram = layer_gram(model, d, layout, layer, sources)
            options.append(layer_options(gram, U, sources, rho, min_gain))
            costs.append(heldout_share_costs(gram, options[-1], d, layout, rho, len(ids), min_gain))
        else:  # pruning alone reads only the held-out costs: no in-sample refit per subset (a factorisation each)
            costs.append(pruning_costs(model, d, layout, layer, rho, len(ids)))
            options.append({r: (0.0, 0.0, {}) for r in costs[-1]})
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
            pick = next(((g, s[:2]) for g, s in ranked.get(u, []) if s[:2] not in removed), None)
            if pick is not None and pick[0] >= min_gain:
                borrow[(layer, u)], gains[(layer, u)] = pick[1], pick[0]
    t1 = time.perf_counter()
    scales, fitted, ridges = refit(model, ids, removed, borrow, rho, progress, heldout, device, cfg.unit,
                                   RIDGES if cfg.crossfit else None)
    borrow = {u: src for u, src in borrow.items() if u in scales}  # the others did not pay off held out
    assignments = [Assignment(layer, u, *borrow[(layer, u)], score=round(gains[(layer, u)], 6),
                              scale=scales[(layer, u)]) for layer, u in sorted(borrow)]
    pruned = sorted(u for u in removed if u not in borrow)
    notes = {"fitted": "o-projection columns of the units that stay in layers with removed units",
             "score": "share of the refit's leftover error that borrowing removes",
             "cost": round(sum(costs[layer][frozenset(u for lay, u in removed if lay == layer)]
                               for layer in {lay for lay, _ in removed}), 9),
             "ridges": ridges_note(ridges),
             "select_seconds": round(t1 - t0, 1), "refit_seconds": round(time.perf_counter() - t1, 1)}
    return new_plan(model, method, cfg.ratio, unit_kind=cfg.unit, assignments=assignments, pruned=pruned, notes=notes,
                    fitted=fitted,
                    base_sha1=base)


@dataclass
class FitPruneConfig(CalibConfig):
    rho: float = RHO  # ridge of the selection's refits, relative to the mean diagonal of the Gram matrix
    # true: the written refit's ridge chosen per layer from refit.RIDGES by cross-fitting, no refit where that
    # is better held out. Off by default: on SmolLM2 it chose rho 1 almost everywhere with docstring
    # calibration (the same plan at 30 %) and, across docstrings+news, stronger ridges that were 1-3 % worse on
    # every text, the unseen code included (BENCHMARKS.md)
    crossfit: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "rho", is_number(self.rho) and self.rho >= 0, "a number >= 0")
        check(self, "crossfit", isinstance(self.crossfit, bool), "true or false")


@dataclass
class FitShareConfig(FitPruneConfig):
    window: int | None = WINDOW  # sources are searched in this many preceding layers (None: all)
    min_gain: float = MIN_GAIN  # a removed unit is a candidate to borrow if that removes this share of its error
    heldout: bool = True  # keep a candidate's source only where it lowers the cross-fitted error

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "window", window_ok(self.window), "an integer >= 1 or none")
        check(self, "min_gain", isinstance(self.min_gain, (int, float)) and not isinstance(self.min_gain, bool)
              and not math.isnan(self.min_gain), "a number")
        check(self, "heldout", isinstance(self.heldout, bool), "true or false")


@register_method("fitshare", FitShareConfig, "share or prune per unit under one budget, refit the o columns that "
                                             "stay (calibration text; the fitted columns travel with the plan)",
                 needs_tokenizer=True)
def fitshare(model, cfg: FitShareConfig, tokenizer=None, progress: bool = False, device=None) -> SharePlan:
    """Units chosen per layer subset with a knapsack over layers on the cross-fitted error left after
    refitting the units that stay; a removed unit is a candidate to borrow its best earlier source when that
    removes >= `min_gain` of the remaining error; then the sequential refit (`refit`), where a candidate keeps its source only if that
    lowers the cross-fitted error (`heldout=False`: always), else it is pruned. The refitted o columns are
    the plan's fitted weights; the model is not changed."""
    return _fit_plan(model, "fitshare", cfg, tokenizer, cfg.rho, cfg.window, cfg.min_gain, progress, cfg.heldout,
                     device)


@register_method("fitprune", FitPruneConfig, "fitshare without sharing: prune per layer subset, refit the o "
                                             "columns that stay (calibration text)", needs_tokenizer=True)
def fitprune(model, cfg: FitPruneConfig, tokenizer=None, progress: bool = False, device=None) -> SharePlan:
    """The same selection and refit as `fitshare`, every removed unit pruned: what sharing adds is the gap."""
    return _fit_plan(model, "fitprune", cfg, tokenizer, cfg.rho, None, math.inf, progress, device=device)
