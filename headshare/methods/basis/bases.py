"""Building the shared bases: a group's q/k/v rows factored through one (rank, hidden) basis, whitened by the
group's calibration inputs, and the row and rank bookkeeping both choices share."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ...arch import blocks
from ...units import own_index


def orient(w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A weight as (out, in), whatever its storage orientation (and back: the map is its own inverse)."""
    return w.T if conv1d else w


def rank_for_budget(dense: list[tuple[int, int]], budget: int) -> int:
    """The largest rank r with sum over groups of (hidden x rows - r x (hidden + rows)) >= budget."""
    total = sum(h * n for h, n in dense)
    per_rank = sum(h + n for h, n in dense)
    return max(0, math.floor((total - budget) / per_rank))


@torch.no_grad()
def whitened_basis(g: torch.Tensor, w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (rank, hidden), coefficients (rows, rank)) minimising ||x w^T - x basis^T coef^T|| for inputs x
    whose Gram x^T x is `g` (float64).

    With x^T x = S S^T, the error is ||S^T (w^T - basis^T coef^T)||: the leading left singular vectors U of
    A = S^T w^T, mapped back, and coef = A^T U. With more rows than the hidden size (every group but a tiny
    one) U comes from the eigenvectors of A A^T (hidden x hidden): on a 7B group of 20,000 rows 38 s against
    the SVD's 224 s, the same subspace."""
    g = g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    s = torch.linalg.cholesky(g)
    a = s.T @ w.T  # (hidden, rows)
    if a.shape[1] > a.shape[0]:
        u = torch.linalg.eigh(a @ a.T)[1].flip(1)[:, :rank]  # eigenvalues ascend: the last are the leading
    else:
        u = torch.linalg.svd(a, full_matrices=False)[0][:, :rank]
    basis = torch.linalg.solve_triangular(s.T, u, upper=True).T  # (rank, hidden)
    return basis, a.T @ u


def layer_groups(num_layers: int, size: int) -> list[list[int]]:
    """Consecutive layers in groups of `size` (the last one may be shorter)."""
    return [list(range(s, min(num_layers, s + size))) for s in range(0, num_layers, size)]


def layer_weight(bl, key: tuple[int, str], ins) -> torch.Tensor:
    """(rows, hidden) float64: a layer's projection weight in (out, in) orientation."""
    layer, path = key
    conv1d = next(p.conv1d for p in ins if p.path == path)
    return orient(bl[layer].get_submodule(path).weight, conv1d).double()


def own_rows(layout, p, layer: int, pruned) -> torch.Tensor:
    """The rows of projection `p` in `layer` that stay when `pruned` goes."""
    return own_index(p, [u for u in range(layout.units_per_layer) if (layer, u) not in pruned])


def group_rows(layout, ins, g: list[int], pruned=frozenset()) -> int:
    """Input-side rows (of the projections `ins`) of a group's layers that stay when `pruned` ((layer, unit)
    pairs) goes."""
    return sum(len(own_rows(layout, p, layer, pruned)) for layer in g for p in ins)


def fit_bases(model, layout, ins, chosen, grams, group_of, rows, progress: bool) -> tuple[list, dict]:
    """([(group layers, basis (rank, hidden))], {(layer, path): coefficients (kept rows, rank)}): each chosen
    group's whitened basis of its rank, fitted on the rows that stay (`rows`) with the group's input Grams
    (`grams[group][fold]`, both folds summed)."""
    bl = blocks(model)
    bases, coefs = [], {}
    for g, r in tqdm(chosen, desc="bases", disable=not progress, unit="group"):
        keys = [(layer, p.path) for layer in g for p in ins]
        gram = grams[group_of[g[0]]][0] + grams[group_of[g[0]]][1]
        w = torch.cat([layer_weight(bl, k, ins).to(gram.device)[rows[k].to(gram.device)] for k in keys])  # (rows, hidden)
        basis, c = whitened_basis(gram, w, r)
        bases.append((g, basis))
        start = 0
        for k in keys:
            coefs[k] = c[start:start + len(rows[k])]
            start += len(rows[k])
    return bases, coefs
