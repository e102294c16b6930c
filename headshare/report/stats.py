"""Rank statistics and cosines for the report, in numpy/torch without scipy."""

from __future__ import annotations

import numpy as np
import torch


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, tied values sharing the mean of their ranks (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # a run of equal values [start, end) gets the rank (start + 1 + end) / 2
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    run_ranks = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the average-tie ranks. NaN if either is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / denom) if denom > 0 else float("nan")


def cosine_matrix(v: torch.Tensor) -> torch.Tensor:
    """Cosine of every pair of rows of `v` (a zero row has cosine 0 with everything)."""
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return v @ v.T



def rounded(a, nd: int = 5) -> list:
    """`a` as nested lists of floats rounded to `nd` places: small, stable JSON."""
    return np.round(np.asarray(a, dtype=np.float64), nd).tolist()
