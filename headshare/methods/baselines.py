"""Baseline methods: the honest comparisons a sharing method has to beat.

Each removes exactly as many attention units as DirectShare at the same ratio (`units_for_ratio`:
floor(ratio x all units)), so every method frees the same attention parameters and only the choice of
units differs:

- `random`: random units of layers >= 1, each borrowing a random unit of a random earlier layer.
- `layerwise`: whole attention blocks borrow the block of the most similar earlier layer, unit u
  from unit u (ALBERT/LaCo-style coarse sharing, what the paper argues against).
- `prune`: the units whose output changes the residual stream least on calibration text are
  removed outright.

    >>> plan = headshare.make_plan(model, 0.3, "prune", tokenizer=tok)   # doctest: +SKIP
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass

import torch

from ..arch import blocks, layout_of
from ..config import check, is_integer
from ..plan import Assignment, SharePlan, new_plan, units_for_ratio
from ..similarity import METRICS, ModelWeights, similarity_matrix
from ..units import refuse_shared, unit_slices
from .base import CalibConfig, MethodConfig, register_method
from .calibration import calibration_ids, walk


@dataclass
class RandomConfig(MethodConfig):
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "seed", is_integer(self.seed), "an integer")


@register_method("random", RandomConfig, "baseline: random units borrow a random unit of a random earlier layer (seeded)")
def random_plan(model, cfg: RandomConfig, tokenizer=None, progress: bool = False, device=None) -> SharePlan:
    """Random sharing: which units borrow, and from where, drawn with `random.Random(seed)`."""
    layout = layout_of(model.config, cfg.unit)
    n = units_for_ratio(cfg.ratio, layout)
    U = layout.units_per_layer
    rng = _random.Random(cfg.seed)
    candidates = [(layer, u) for layer in range(1, layout.num_layers) for u in range(U)]
    chosen = sorted(rng.sample(candidates, n))
    # sources are drawn in sorted order, so the plan depends on the seed alone
    assignments = [Assignment(layer, u, rng.randrange(layer), rng.randrange(U)) for layer, u in chosen]
    return new_plan(model, "random", cfg.ratio, unit_kind=cfg.unit, assignments=assignments)


def layer_similarity(sim: torch.Tensor, num_layers: int, units_per_layer: int) -> torch.Tensor:
    """(L, L) layer similarity: mean over u of the unit cosine between unit u of each layer.

    Aligned units (u with u) because that is the mapping whole-layer sharing applies; the
    similarity of a layer pair is then the mean match score of the units it would share.
    """
    s = sim.view(num_layers, units_per_layer, num_layers, units_per_layer)
    return torch.diagonal(s, dim1=1, dim2=3).mean(-1)  # (L, L, U) -> (L, L)


@dataclass
class LayerwiseConfig(MethodConfig):
    metric: str = "qk"  # the unit match function whose aligned mean scores a pair of layers

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "metric", self.metric in METRICS, f"one of {', '.join(METRICS)}")


@register_method("layerwise", LayerwiseConfig, "baseline: whole attention blocks borrow the most similar earlier layer")
def layerwise(model, cfg: LayerwiseConfig, tokenizer=None, progress: bool = False, device=None) -> SharePlan:
    """Whole-layer sharing with the dynamic strategy applied to layers instead of units.

    Every layer l >= 1 picks the earlier layer with the highest `layer_similarity` (mean aligned
    `metric` cosine); layers are taken whole, best score first, until floor(ratio x units) units are
    reached. When that count is not a multiple of the units per layer, the last layer taken is
    partial: only its units with the highest aligned cosine to the chosen layer borrow.
    """
    metric = cfg.metric
    layout = layout_of(model.config, cfg.unit)
    n = units_for_ratio(cfg.ratio, layout)
    L, U = layout.num_layers, layout.units_per_layer
    sim = similarity_matrix(ModelWeights(model, cfg.unit), metric, progress=progress)
    lsim = layer_similarity(sim, L, U)
    proposals = []  # (score, layer, source_layer); ties go to the earliest source layer
    for layer in range(1, L):
        src = max(range(layer), key=lambda j: (float(lsim[layer, j]), -j))
        proposals.append((float(lsim[layer, src]), layer, src))
    proposals.sort(key=lambda t: (-t[0], t[1]))
    assignments: list[Assignment] = []
    partial = None
    for _, layer, src in proposals:
        left = n - len(assignments)
        if left <= 0:
            break
        units = sorted(range(U), key=lambda u: (-float(sim[layer * U + u, src * U + u]), u))[:left]
        if len(units) < U:
            partial = layer
        assignments += [Assignment(layer, u, src, u, score=round(float(sim[layer * U + u, src * U + u]), 6))
                        for u in units]
    assignments.sort(key=lambda a: (a.layer, a.unit))
    notes = {"layer_scores": {str(layer): [src, round(s, 6)] for s, layer, src in proposals},
             "partial_layer": partial}
    return new_plan(model, "layerwise", cfg.ratio, unit_kind=cfg.unit, metric=metric, assignments=assignments, notes=notes)


@torch.inference_mode()
def output_energy(model, tokenizer, calib: str = "builtin:calib", calib_tokens: int = 8192,
                  block_size: int = 512, relative: bool = True, progress: bool = False,
                  device=None, unit: str = "kv") -> torch.Tensor:
    """(L, U) importance of every unit from what it writes into the residual stream on calibration text.

    y_u(t) = x_u(t) W_o,u^T is unit u's share of the o projection's output at token t (x_u: its heads'
    attention output, W_o,u: its columns of o). The score is the mean over tokens of

    - relative=True (default): ||y_u(t)||^2 / ||h(t)||^2, h(t) being the residual stream entering the
      block: how much the unit changes the stream, relative to its size;
    - relative=False: ||y_u(t)||^2, the raw output energy.

    Why relative: the residual stream grows with depth (by about 5 orders of magnitude over SmolLM2's
    30 layers, and by far the most on a few "massive activation" tokens), so raw energy ranks whole
    early layers as least important; on SmolLM2 it prunes all of layer 0 first (BENCHMARKS.md).

    Both are computed from a weighted Gram matrix of each layer's o input, G = sum_t w_t x(t)^T x(t),
    with w_t = 1 / ||h(t)||^2 or 1: score_u = <W_u^T W_u, G_uu> / tokens, layer by layer through the
    calibration pipeline (`calibration.walk`). `unit` is the unit kind the scores are per (`headshare.arch`).
    """
    refuse_shared(model, "importance")
    layout = layout_of(model.config, unit)
    ids = calibration_ids(model, tokenizer, calib, calib_tokens, block_size)
    o = layout.o_projection()
    U, T = layout.units_per_layer, ids.shape[1]
    energy = torch.empty(layout.num_layers, U, dtype=torch.float64)
    # one sequence per block call, the Gram summed sequence by sequence
    for layer, d in walk(model, ids, device, progress, batch_tokens=T):
        g = None
        for row in range(ids.shape[0]):
            x = d.z[row * T:(row + 1) * T].float()  # (tokens, in)
            if relative:
                stream = d.h[row].reshape(-1, d.h.shape[-1]).float().pow(2).sum(-1).clamp_min(1e-12)
                x = x / stream.sqrt()[:, None]
            gr = (x.T @ x).double()
            g = gr if g is None else g + gr
        w = unit_slices(blocks(model)[layer].get_submodule(o.path).weight.detach(), o, U)["o"].double()
        for u in range(U):
            idx = o.unit_index(u).to(g.device)
            energy[layer, u] = float((w[u].T @ w[u] * g[idx][:, idx]).sum() / ids.numel())
    return energy


@dataclass
class PruneConfig(CalibConfig):
    calib_tokens: int = 8192
    relative: bool = True  # rank by output energy relative to the residual stream (False: raw energy)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "relative", isinstance(self.relative, bool), "true or false")


@register_method("prune", PruneConfig, "baseline: remove the units that change the residual stream least on "
                                       "calibration text", needs_tokenizer=True)
def prune(model, cfg: PruneConfig, tokenizer=None, progress: bool = False, device=None) -> SharePlan:
    """Head pruning by output energy relative to the residual stream (see `output_energy`), lowest first.

    Units of every layer, layer 0 included, are candidates: a pruned unit needs no source, and
    restricting pruning to layers >= 1 would weaken the baseline. Ties go to the earlier unit.
    `relative=False` ranks by raw output energy instead (a weaker score, kept for comparison).
    """
    layout = layout_of(model.config, cfg.unit)
    n = units_for_ratio(cfg.ratio, layout)
    score = "||unit's o output||^2 / ||residual stream||^2" if cfg.relative else "||unit's o output||^2"
    notes = {"importance": f"mean over calibration tokens of {score}"}
    if n == 0:
        return new_plan(model, "prune", cfg.ratio, unit_kind=cfg.unit, notes=notes)
    energy = output_energy(model, tokenizer, cfg.calib, cfg.calib_tokens, relative=cfg.relative, progress=progress,
                           device=device, unit=cfg.unit)
    order = sorted((float(energy[layer, u]), layer, u)
                   for layer in range(layout.num_layers) for u in range(layout.units_per_layer))
    pruned = sorted((layer, u) for _, layer, u in order[:n])
    notes["scores"] = [[layer, u, float(f"{e:.6g}")] for e, layer, u in order[:n]]
    return new_plan(model, "prune", cfg.ratio, unit_kind=cfg.unit, pruned=pruned, notes=notes)
