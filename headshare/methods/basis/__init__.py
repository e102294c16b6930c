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
the same half, measured on the other half and both ways round (`heldout.choice_costs`); a dynamic programme over the
parameters removed picks the combination (`heldout.allocate`). Bases are then refitted on the rows that stay, and the
sequential pass is the same. On SmolLM2 with query-head units it beats the fixed split at 10-30 %; on key/value
units, and on Gemma 3 270M at 30-50 %, it loses to it (BENCHMARKS.md): there the layer-local error overrates
what a basis costs the whole model against what pruning costs it.

    >>> plan = headshare.make_plan(model, BasisShareConfig(ratio=0.3), tokenizer=tok)   # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...arch import layout_of
from ...config import check, is_integer, is_number
from ...plan import new_plan, units_for_ratio
from ...units import weights_fingerprint
from ..base import CalibConfig, register_method
from ..calibration import Stash, calibration_ids, layer_gram, walk
from ..fitshare import pruning_costs
from ..lstsq import candidate_subsets, half
from ..refit import RHO, RIDGES, ridges_note
from .bases import fit_bases, layer_groups, own_rows
from .fixed import fixed_choice
from .heldout import RANKS, heldout_choice
from .write import basis_tensors, sequential_refit

GROUP = 4  # layers per basis; SmolLM2 at 30 %, prune 2/3: 2 layers 17.97, 4 layers 17.88, 8 layers 18.01


PRUNE = 2 / 3  # share of the budget pruning takes; SmolLM2 at 30 %, 2 layers: 1/2 18.03, 2/3 17.97, 4/5 18.14


@dataclass
class BasisShareConfig(CalibConfig):
    group: int = GROUP  # consecutive layers that share one basis
    prune: float = PRUNE  # share of the parameter budget spent on pruning whole units (the rest: bases)
    rho: float = RHO  # ridge of the o refit, as in fitprune
    crossfit: bool = False  # the refit's ridge cross-fitted per layer (no refit where none pays off), as in fitprune

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "group", is_integer(self.group) and self.group >= 1, "an integer >= 1")
        check(self, "prune", is_number(self.prune) and 0 <= self.prune <= 1, "a number in [0, 1]")
        check(self, "rho", is_number(self.rho) and self.rho >= 0, "a number >= 0")
        check(self, "crossfit", isinstance(self.crossfit, bool), "true or false")


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
    """basisshare's options (`prune` is not read: the held-out choice decides what pruning takes) and how many
    basis ranks it weighs per group."""

    ranks: int = RANKS  # rank candidates a group (at most); each costs a layer 2 attention runs, 2 folds' statistics, 2 chains

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "ranks", is_integer(self.ranks) and self.ranks >= 1, "an integer >= 1")


@register_method("choiceshare", ChoiceShareConfig, "basisshare with the split chosen by held-out error: per group "
                                                   "of layers a basis rank or none, per layer the units to prune "
                                                   "(calibration text; the fitted tensors travel with the plan)",
                 needs_tokenizer=True)
def choiceshare(model, cfg: ChoiceShareConfig, tokenizer=None, progress: bool = False, device=None):
    """basisshare with the held-out choice (see `heldout_choice`); the model is not changed."""
    return _plan(model, cfg, tokenizer, progress, "choiceshare", True, device)


@torch.no_grad()
def _plan(model, cfg: BasisShareConfig, tokenizer, progress: bool, name: str, heldout: bool, device=None):
    t0 = time.perf_counter()
    layout = layout_of(model.config, cfg.unit)
    U, L = layout.units_per_layer, layout.num_layers
    n = units_for_ratio(cfg.ratio, layout)
    if n == 0:
        return new_plan(model, name, cfg.ratio, unit_kind=cfg.unit)
    budget = n * layout.unit_params()
    ids = calibration_ids(model, tokenizer, cfg.calib, cfg.calib_tokens)
    base = weights_fingerprint(model, cfg.unit)
    ins = layout.in_projections()  # what the bases carry
    n_prune = 0 if heldout else round(cfg.prune * n)
    groups = layer_groups(L, cfg.group)
    group_of = {layer: i for i, g in enumerate(groups) for layer in g}
    tokens = ids.numel()
    split = half(tokens, len(ids))
    folds = (slice(0, split), slice(split, tokens))

    with Stash() as stash:
        # one walk: every group's attention-input Grams per fold (the bases' whitening; each group's waits in
        # `stash` once its layers have passed: the held-out choice reads the folds, the bases their sum), and
        # per layer what the choice needs (heldout: the subsets worth weighing; fixed: the pruning costs)
        gram: list = [0.0, 0.0]
        subsets, prune_costs = {}, []
        t_choice = time.perf_counter()
        for layer, d in walk(model, ids, device, progress, desc="inputs"):
            x = d.x.double()
            gram = [gram[f] + x[part].T @ x[part] for f, part in enumerate(folds)]
            if heldout:
                cands = candidate_subsets(layer_gram(model, d, layout, layer, []), U, cfg.rho)
                subsets[layer] = [frozenset(), *(frozenset(c) for c in cands)]
            elif n_prune:
                prune_costs.append(pruning_costs(model, d, layout, layer, cfg.rho, len(ids)))
            if layer == groups[group_of[layer]][-1]:
                stash[("gram", group_of[layer])] = tuple(gram) if heldout else (gram[0] + gram[1],)
                gram = [0.0, 0.0]
        grams = _Grams(stash, len(groups))
        if heldout:
            again = lambda: walk(model, ids, device, progress, desc="choice costs")  # noqa: E731
            pruned, chosen = heldout_choice(model, again, layout, grams, ins, cfg, subsets, split, budget)
        else:
            pruned, chosen = fixed_choice(layout, ins, cfg, n_prune, prune_costs, budget)
        t_choice = time.perf_counter() - t_choice

        rows = {(layer, p.path): own_rows(layout, p, layer, pruned) for layer in range(L) for p in ins}
        bases, coefs = fit_bases(model, layout, ins, chosen, grams, group_of, rows, progress, stash)
        t1 = time.perf_counter()

        fitted, ridges = sequential_refit(model, ids, layout, ins, pruned, rows, coefs, bases.by_layer(), cfg.rho,
                                          device, progress, RIDGES if cfg.crossfit else None)
        fitted.update(basis_tensors(model, layout, ins, bases, coefs))
    h = layout.hidden_size
    by_bases = sum(h * m - r * (h + m) for m, r in ((sum(len(rows[(la, p.path)]) for la in g for p in ins), r)
                                                     for g, r in chosen))
    if len(pruned) * layout.unit_params() + by_bases < budget:  # the accounting above is exact; this cannot be
        raise AssertionError(f"basisshare removed {len(pruned) * layout.unit_params() + by_bases} < {budget}")
    notes = {"fitted": "o columns of the units that stay in touched layers; bases and their coefficients",
             "select": "heldout" if heldout else "fixed", "rank": max((r for _, r in chosen), default=0),
             "ranks": [r for _, r in chosen], "groups": len(bases), "units_pruned": len(pruned),
             "params_budget": budget, "params_by_bases": by_bases,
             "choice_seconds": round(t_choice, 1), "ridges": ridges_note(ridges),
             "select_seconds": round(t1 - t0, 1), "refit_seconds": round(time.perf_counter() - t1, 1)}
    return new_plan(model, name, cfg.ratio, unit_kind=cfg.unit, pruned=sorted(pruned), notes=notes, fitted=fitted,
                    base_sha1=base, bases=[{"layers": g, "rank": r} for g, r in chosen])


class _Grams(Sequence):
    """Each group's input Grams (the two folds, or their sum), read from the stash when indexed."""

    def __init__(self, stash: Stash, n: int):
        self._stash, self._n = stash, n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self._stash[("gram", i)]

    def __len__(self) -> int:
        return self._n
