"""Building the shared bases: a group's q/k/v rows factored through one (rank, hidden) basis, whitened by the
group's calibration inputs, and the row and rank bookkeeping both choices share."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

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
def whitened_basis(g: torch.Tensor, ws: Iterable[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (rank, hidden), coefficient map (hidden, rank)) minimising ||x w^T - x basis^T coef^T|| for the
    rows w of all of `ws` together ((rows, hidden) float64 pieces, read once, one at a time), inputs x whose
    Gram x^T x is `g` (float64), and coef = w @ map: each piece's coefficients come from its own rows.

    With x^T x = S S^T, the error is ||S^T (w^T - basis^T coef^T)||: the leading left singular vectors U of
    A = S^T w^T, mapped back, and coef = A^T U = w S U. With more rows than the hidden size (every group but a
    tiny one) U comes from the eigenvectors of A A^T = S^T (sum of w'w over the pieces) S, so the group's rows
    are never stacked: a 7B group of four layers would stack 40,000 rows (1.3 GB in float64) where the sum is
    one hidden x hidden matrix."""
    g = g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    s = torch.linalg.cholesky(g)
    h = g.shape[0]
    ww, few, n = 0.0, [], 0  # few: the pieces while they add up to at most h rows (then the SVD of A is cheaper)
    for w in ws:
        ww, n = ww + w.T @ w, n + len(w)
        few = [*few, w] if n <= h else []
    if n > h:
        u = torch.linalg.eigh(s.T @ ww @ s)[1].flip(1)[:, :rank]  # eigenvalues ascend: the last are the leading
    else:
        u = torch.linalg.svd(s.T @ torch.cat(few).T, full_matrices=False)[0][:, :rank]
    basis = torch.linalg.solve_triangular(s.T, u, upper=True).T  # (rank, hidden)
    return basis, s @ u


def layer_groups(num_layers: int, size: int) -> list[list[int]]:
    """Consecutive layers in groups of `size` (the last one may be shorter)."""
    return [list(range(s, min(num_layers, s + size))) for s in range(0, num_layers, size)]


def layer_weight(bl, key: tuple[int, str], ins) -> torch.Tensor:
    """(rows, hidden) float64: a layer's projection weight in (out, in) orientation."""
    layer, path = key
    conv1d = next(p.conv1d for p in ins if p.path == path)
    return orient(bl[layer].get_submodule(path).weight, conv1d).double()


def kept_rows(bl, ins, rows: dict, key: tuple[int, str], device) -> torch.Tensor:
    """(kept rows, hidden) float64 on `device`: the rows of a layer's projection that stay (`rows[key]`)."""
    return layer_weight(bl, key, ins).to(device)[rows[key].to(device)]


def own_rows(layout, p, layer: int, pruned) -> torch.Tensor:
    """The rows of projection `p` in `layer` that stay when `pruned` goes."""
    return own_index(p, [u for u in range(layout.units_per_layer) if (layer, u) not in pruned])


def group_rows(layout, ins, g: list[int], pruned=frozenset()) -> int:
    """Input-side rows (of the projections `ins`) of a group's layers that stay when `pruned` ((layer, unit)
    pairs) goes."""
    return sum(len(own_rows(layout, p, layer, pruned)) for layer in g for p in ins)


class Bases(Sequence):
    """The fitted bases as [(group layers, basis (rank, hidden) float64)], each group's basis and coefficient
    map (hidden, rank) waiting in a `Stash` under ("basis", i) and read when asked for; `by_layer` maps a
    layer to its group's basis."""

    def __init__(self, groups: list[list[int]], stash):
        self.groups, self._stash = groups, stash

    def __getitem__(self, i: int) -> tuple[list[int], torch.Tensor]:
        return self.groups[i], self._stash[("basis", i)][0]

    def __len__(self) -> int:
        return len(self.groups)

    def coef_map(self, i: int) -> torch.Tensor:
        return self._stash[("basis", i)][1]

    def by_layer(self) -> Mapping[int, torch.Tensor]:
        return _ByLayer(self)


class _ByLayer(Mapping):
    def __init__(self, bases: Bases):
        self._bases = bases
        self._group = {layer: i for i, g in enumerate(bases.groups) for layer in g}

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self._bases[self._group[layer]][1]

    def __iter__(self):
        return iter(self._group)

    def __len__(self) -> int:
        return len(self._group)


class Coefs(Mapping):
    """{(layer, path): coefficients (kept rows, rank), float64} of the fitted bases, each computed when asked
    for from the layer's weights and its group's coefficient map (hidden, rank). Kept as maps, not products: a
    7B layer's coefficients are about 10,000 x 3,100 float64 (250 MB), so holding them all grew the working
    memory by that much for every layer; a map is one per group of layers (and waits on disk, `Bases`)."""

    def __init__(self, bl, ins, rows: dict, bases: Bases):
        self._bl, self._ins, self._rows, self._bases = bl, ins, rows, bases
        self._group = {(layer, p.path): i for i, g in enumerate(bases.groups) for layer in g for p in ins}

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        m = self._bases.coef_map(self._group[key])
        return kept_rows(self._bl, self._ins, self._rows, key, m.device) @ m

    def __iter__(self):
        return iter(self._group)

    def __len__(self) -> int:
        return len(self._group)


def fit_bases(model, layout, ins, chosen, grams, group_of, rows, progress: bool, stash) -> tuple[Bases, Coefs]:
    """(`Bases`, coefficients by (layer, path) (`Coefs`)): each chosen group's whitened basis of its rank,
    fitted on the rows that stay (`rows`) with the group's input Grams (`grams[group]`: its two folds, summed
    here, or their sum already), put in `stash`."""
    bl = blocks(model)
    for i, (g, r) in enumerate(tqdm(chosen, desc="bases", disable=not progress, unit="group")):
        keys = [(layer, p.path) for layer in g for p in ins]
        folds = grams[group_of[g[0]]]
        gram = folds[0] + folds[1] if len(folds) == 2 else folds[0]
        stash[("basis", i)] = whitened_basis(gram, (kept_rows(bl, ins, rows, k, gram.device) for k in keys), r)
        del gram, folds
    bases = Bases([g for g, _ in chosen], stash)
    return bases, Coefs(bl, ins, rows, bases)
