"""basisshare's fixed split: `prune` of the budget to pruning whole units (fitprune's choice), the rest to one
rank for every group of layers."""

from __future__ import annotations

from ...errors import HeadshareError
from ..lstsq import knapsack
from .bases import group_rows, layer_groups, rank_for_budget


def fixed_choice(layout, ins, cfg, n_prune: int, costs: list[dict], budget: int):
    """basisshare's fixed split: `prune` of the budget (`n_prune` units) to pruning units (fitprune's knapsack over the
    per-layer `costs`), the rest to one rank for every group that the budget allows. Returns (pruned units,
    [(group layers, rank)])."""
    U, L = layout.units_per_layer, layout.num_layers
    pruned: set = set(knapsack(costs, n_prune)) if n_prune else set()
    left = budget - len(pruned) * layout.unit_params()
    groups = layer_groups(L, cfg.group)
    groups = [g for g in groups if any((layer, u) not in pruned for layer in g for u in range(U))]
    rank = 0
    while left > 0 and groups:
        dense = [(layout.hidden_size, group_rows(layout, ins, g, pruned)) for g in groups]
        rank = rank_for_budget(dense, left)
        # a group whose factors would not be smaller than its weights (few rows left after pruning) stays dense
        worth = [g for g, (h, m) in zip(groups, dense, strict=True) if rank * (h + m) < h * m]
        if len(worth) == len(groups):
            break
        groups, rank = worth, 0
    if left > 0 and rank == 0:
        raise HeadshareError(f"ratio {cfg.ratio} with prune={cfg.prune} leaves the bases a budget no rank >= 1 meets; "
                         "raise prune or lower the ratio")
    return pruned, [(g, rank) for g in groups] if rank else []
