"""`headshare.methods.lstsq`: the fits and the knapsack, and the fast paths against direct ones.

Ridge refits, fitted scales, cross-fitting and the knapsack on tiny models; the fast paths of `lstsq` against
the direct computations they replace.

The oracles below are the earlier implementations (`candidate_subsets` refactorising every candidate's kept
set, and the same at the fixed ridge the fast order uses, `basis.heldout.subset_errors` solving with
hidden-wide right-hand sides, `heldout_share_costs` refitting on the tokens), kept here verbatim in substance
so that the fast ones are checked against them and not against themselves.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import headshare
from headshare.arch import blocks, layout_of
from headshare.methods import lstsq
from headshare.methods.basis.heldout import subset_errors
from headshare.methods.calibration import borrowed_z, calibration_ids, capture, layer_gram
from headshare.methods.gram import LayerGram
from headshare.methods.lstsq import (
    EXHAUSTIVE,
    RidgeResidual,
    candidate_subsets,
    crossfit_moments,
    crossfit_ridge,
    fit_scales,
    fold_grams,
    greedy_order,
    half,
    heldout_lenders,
    heldout_lending,
    heldout_prune_costs,
    heldout_share_costs,
    knapsack,
    layer_options,
    nested_prune_errors,
    prune_errors,
    refit_moments,
    ridge_from_moments,
)
from headshare.units import o_columns, unit_z

# --- oracles: the implementations the fast paths replace ---------------------------------------------------


def old_candidate_subsets(gram: LayerGram, units: int, rho: float) -> list[tuple[int, ...]]:
    """The greedy nested order with one factorisation per candidate (each with its own kept set's ridge)."""
    order: list[int] = []
    out = []
    while len(order) < units:
        def cost(u: int) -> float:
            removed = [*order, u]
            gram.set_kept([("own", v) for v in range(units) if v not in removed], rho)
            return gram.cost(removed, {})

        order.append(min((u for u in range(units) if u not in order), key=lambda u: (cost(u), u)))
        out.append(tuple(sorted(order)))
    return out


def fixed_ridge_greedy(g: torch.Tensor, ww: torch.Tensor, widths: list[int], lam: float) -> list[tuple[int, ...]]:
    """The greedy nested order with one solve per candidate, every refit at the same ridge `lam`."""
    starts = [0, *itertools.accumulate(widths)]

    def idx(us):
        return torch.cat([torch.arange(starts[u], starts[u + 1]) for u in us]) if us else torch.zeros(0, dtype=torch.long)

    order: list[int] = []
    out = []
    while len(order) < len(widths):
        def cost(u: int) -> float:
            r = idx([*order, u])
            k = idx([v for v in range(len(widths)) if v not in order and v != u])
            left = g[r][:, r]
            if len(k):
                left = left - g[r][:, k] @ torch.linalg.solve(g[k][:, k] + lam * torch.eye(len(k), dtype=g.dtype),
                                                               g[k][:, r])
            return max(float((ww[r][:, r] * left).sum()), 0.0)

        order.append(min((u for u in range(len(widths)) if u not in order), key=lambda u: (cost(u), u)))
        out.append(tuple(sorted(order)))
    return out


def old_heldout_share_costs(gram: LayerGram, options: dict, data, layout, rho: float, rows: int,
                            min_gain: float) -> dict:
    """`heldout_share_costs` refitting every subset on the tokens themselves."""
    U = layout.units_per_layer
    z = {u: gram.z[("own", u)].double() for u in range(U)}
    y = {u: z[u] @ gram.o[("own", u)].T for u in range(U)}
    n = data.w.shape[0]
    split = half(n, rows)
    out = {}
    for removed, (_, _, ranked) in options.items():
        kept = [u for u in range(U) if u not in removed]
        kz = torch.cat([z[u] for u in kept], 1) if kept else None
        v = sum(y[u] for u in removed)
        ys = {u: gram.z[r[0][1]].double() @ gram.o[r[0][1]].T for u, r in ranked.items()
              if r and r[0][0] >= min_gain}
        out[removed] = heldout_lending(kz, v, data.w, ys, rho, split)[1] / n
    return out


def exact_fold_stats(z: torch.Tensor, wo: torch.Tensor, w: torch.Tensor, part: slice) -> tuple:
    """`basis.heldout.fold_stats` in float64 throughout, for the target a = z wo' (no rounding between the two)."""
    zf, wf = z[part].double(), w[part].double()
    a = zf @ wo.T
    zw = zf * wf
    return zf.T @ zw, zw.T @ a, float((a ** 2 * wf).sum())


# --- random layers -----------------------------------------------------------------------------------------


def random_layer(units: int, width: int, hidden: int, tokens: int, seed: int, sources: int = 0):
    """Features with shared directions (so that refits matter) and units of unequal size, o columns of unequal
    scale, positive token weights; `sources` extra borrowed features under keys (0, j)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(units * width, units * width, generator=g) / (units * width) ** 0.5
    base = torch.randn(tokens, units * width, generator=g)
    z = (0.5 * base + base @ mix) * torch.rand(units * width, generator=g).add(0.2)
    feats = {("own", u): z[:, u * width:(u + 1) * width] for u in range(units)}
    cols = {("own", u): torch.randn(hidden, width, generator=g, dtype=torch.float64) * (1 + u % 3)
            for u in range(units)}
    for j in range(sources):
        feats[(0, j)] = z[:, (j % units) * width:(j % units + 1) * width] * 0.9 + \
            0.3 * torch.randn(tokens, width, generator=g)
        cols[(0, j)] = torch.randn(hidden, width, generator=g, dtype=torch.float64)
    w = torch.rand(tokens, 1, generator=g, dtype=torch.float64) + 0.5
    return feats, cols, w


@pytest.mark.parametrize("rho", [0.0, 1e-3, 1.0, 1e3])
def test_greedy_order_is_the_refactorising_greedy_at_its_ridge(rho):
    """The downdated order (one factorisation per layer) against a solve per candidate, on unequal blocks."""
    widths = [3, 4, 3, 5, 3, 4, 2, 4]
    total = sum(widths)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(300, total, generator=g, dtype=torch.float64) @ torch.randn(
            total, total, generator=g, dtype=torch.float64) * torch.rand(total, generator=g, dtype=torch.float64)
        w = torch.rand(300, 1, generator=g, dtype=torch.float64) + 0.1
        o = torch.randn(11, total, generator=g, dtype=torch.float64)
        gram, ww = z.T @ (z * w), o.T @ o
        lam = rho * float(gram.diagonal().mean())
        got = greedy_order(gram, ww, widths, lam)
        assert got == fixed_ridge_greedy(gram, ww, widths, lam)
        assert [len(s) for s in got] == list(range(1, len(widths) + 1))
        assert all(set(a) < set(b) for a, b in zip(got, got[1:], strict=False))


def test_candidate_subsets_without_ridge_follow_the_refactorising_greedy():
    """rho = 0: no ridge, so fixing it changes nothing and the order is the one the old code gave."""
    for seed in range(2):
        feats, cols, w = random_layer(8, 4, 12, 200, seed)
        old = old_candidate_subsets(LayerGram(feats, cols, w), 8, 0.0)
        assert candidate_subsets(LayerGram(feats, cols, w), 8, 0.0) == old


def test_candidate_subsets_take_the_whole_layers_ridge():
    """With a ridge, the order is the fixed-ridge greedy at rho x the mean diagonal of the whole layer's Gram."""
    feats, cols, w = random_layer(8, 8, 32, 256, 8005)
    gram = LayerGram(feats, cols, w)
    keys = [("own", u) for u in range(8)]
    g = torch.cat([torch.cat([gram.g(a, b) for b in keys], 1) for a in keys], 0)
    ww = torch.cat([torch.cat([gram.ww(a, b) for b in keys], 1) for a in keys], 0)
    want = fixed_ridge_greedy(g, ww, [8] * 8, float(g.diagonal().mean()))
    assert candidate_subsets(gram, 8, 1.0) == want


def test_candidate_subsets_remove_silent_units_first_in_index_order():
    """Units whose output is zero cost nothing to remove: they tie and go first, the lower index first."""
    feats, cols, w = random_layer(8, 4, 12, 200, 4)
    for u in (5, 2):
        feats[("own", u)] = torch.zeros_like(feats[("own", u)])
    old = old_candidate_subsets(LayerGram(feats, cols, w), 8, 1.0)
    assert old[:2] == [(2,), (2, 5)]
    assert candidate_subsets(LayerGram(feats, cols, w), 8, 1.0)[:2] == old[:2]


def test_prune_errors_match_the_hidden_wide_solve():
    g = torch.Generator().manual_seed(3)
    n, width, hidden = 200, 23, 17
    z = torch.randn(n, width, generator=g, dtype=torch.float64) @ torch.randn(width, width, generator=g,
                                                                               dtype=torch.float64)
    w = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.1
    wo = torch.randn(hidden, width, generator=g, dtype=torch.float64)
    # units own interleaved columns (like key/value units with several parts); column 22 is no unit's
    cols = [torch.tensor([0, 1, 10, 11, 12]), torch.tensor([2, 3, 13, 14]), torch.tensor([4, 5, 6, 15, 16]),
            torch.tensor([7, 8, 17, 18]), torch.tensor([9, 19, 20, 21])]
    folds = (slice(0, 90), slice(90, n))
    stats = [exact_fold_stats(z, wo, w, f) for f in folds]
    subsets = [frozenset(c) for k in range(6) for c in itertools.combinations(range(5), k)]
    for rho in (0.0, 1.0, 1e8):
        want = subset_errors((stats[0], stats[1]), (stats[1], stats[0]), wo, cols, subsets, rho, n)
        got = prune_errors((stats[0][0], stats[1][0]), wo, cols, subsets, rho, n)
        assert list(got) == subsets
        for s in subsets:
            assert got[s] == pytest.approx(want[s], rel=1e-9, abs=1e-12 * want[frozenset(range(5))])


def test_heldout_costs_without_lenders_match_the_token_refits():
    U = 5
    feats, cols, w = random_layer(U, 3, 8, 160, 11)
    gram = LayerGram(feats, cols, w)
    layout, data = SimpleNamespace(units_per_layer=U), SimpleNamespace(w=w)
    for rho in (1e-2, 1.0):
        options = layer_options(gram, U, [], rho, math.inf)
        want = old_heldout_share_costs(gram, options, data, layout, rho, 4, math.inf)
        for got in (heldout_share_costs(gram, options, data, layout, rho, 4, math.inf),
                    heldout_prune_costs(gram, options, data, layout, rho, 4)):
            assert list(got) == list(want)
            assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-9)


def test_heldout_costs_with_lenders_are_unchanged():
    """Subsets with a candidate lender keep the token path; the others take the fast one; the dict is the same."""
    U = 4
    feats, cols, w = random_layer(U, 3, 8, 160, 5, sources=3)
    gram = LayerGram(feats, cols, w)
    layout, data = SimpleNamespace(units_per_layer=U), SimpleNamespace(w=w)
    sources = [(0, j) for j in range(3)]
    for min_gain in (0.0, 0.1):
        options = layer_options(gram, U, sources, 1.0, min_gain)
        want = old_heldout_share_costs(gram, options, data, layout, 1.0, 2, min_gain)
        got = heldout_share_costs(gram, options, data, layout, 1.0, 2, min_gain)
        assert list(got) == list(want)
        assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-9)


@pytest.mark.slow
def test_on_a_smollm2_layer_with_query_units(smollm2_dir, monkeypatch):
    """A real layer (9 query-head units of width 64, hidden 576): on the greedy's nested subsets the held-out
    costs are the per-subset solves at the layer's fixed ridge (`nested_prune_errors`), each subset's own-ridge
    errors (`prune_errors`) agree with the hidden-wide solve, and the greedy order is the fixed-ridge greedy's."""
    from headshare.fetch import load_model

    model, tok = load_model(str(smollm2_dir))
    ids = calibration_ids(model, tok, "builtin:calib", 2048)
    layout = layout_of(model.config, "query")
    data = capture(model, ids)
    layer, U = 5, layout.units_per_layer
    gram = layer_gram(model, data[layer], layout, layer, [])
    assert U == 9
    d = data[layer]
    subsets = [frozenset(s) for s in candidate_subsets(gram, U, 1.0)]
    options = {s: (0.0, 0.0, {u: [] for u in s}) for s in subsets}
    got = heldout_share_costs(gram, options, d, layout, 1.0, len(ids), math.inf)
    z = torch.cat([gram.z[("own", u)].double() for u in range(U)], 1)
    o = torch.cat([gram.o[("own", u)].double() for u in range(U)], 1)
    blocks_ = [torch.arange(64 * u, 64 * u + 64) for u in range(U)]
    n = d.w.shape[0]
    grams = fold_grams(z, d.w, half(n, len(ids)))
    want = prune_errors(grams, o, blocks_, subsets, 1.0, n, fixed_ridge=True)
    # the chain in `CHAIN_DTYPE` (float32) to float32's precision, in float64 to 1e-8
    assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-4)
    monkeypatch.setattr(lstsq, "CHAIN_DTYPE", torch.float64)
    exact = heldout_share_costs(gram, options, d, layout, 1.0, len(ids), math.inf)
    assert list(exact.values()) == pytest.approx(list(want.values()), rel=1e-8)
    # the fixed ridge against each subset's own: the same costs to within a few per cent here
    own = prune_errors(grams, o, blocks_, subsets, 1.0, n)
    assert list(got.values()) == pytest.approx(list(own.values()), rel=0.05)

    op = layout.o_projection()
    wo = blocks(model)[layer].get_submodule(op.path).weight.detach().double()  # (D, in): Llama's o is an nn.Linear
    cols = [op.unit_index(u) for u in range(U)]
    n = d.z.shape[0]
    folds = (slice(0, half(n, len(ids))), slice(half(n, len(ids)), n))
    stats = [exact_fold_stats(d.z, wo, d.w, f) for f in folds]
    want = subset_errors((stats[0], stats[1]), (stats[1], stats[0]), wo, cols, subsets, 1.0, n)
    got = prune_errors((stats[0][0], stats[1][0]), wo, cols, subsets, 1.0, n)
    assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-9)
    keys = [("own", u) for u in range(U)]
    g = torch.cat([torch.cat([gram.g(a, b) for b in keys], 1) for a in keys], 0)
    ww = torch.cat([torch.cat([gram.ww(a, b) for b in keys], 1) for a in keys], 0)
    assert candidate_subsets(gram, U, 1.0) == fixed_ridge_greedy(g, ww, [64] * U, float(g.diagonal().mean()))


@pytest.mark.parametrize("rho", [0.0, 1e-2, 1.0, 1e3])
@pytest.mark.parametrize("widths", [[3, 4, 3, 5, 3, 4, 2, 4], [4] * 8], ids=["mixed", "equal"])
def test_nested_prune_errors_are_the_per_subset_solves_at_the_fixed_ridge(rho, widths):
    """The downdated errors of a nested chain against one Cholesky per subset (`fixed_ridge=True`). Units of
    mixed widths shift the rows after a leaving unit up; units of one width (query heads) move the last unit
    into the gap: both orders of the rows give the same errors."""
    g = torch.Generator().manual_seed(7)
    total, n = sum(widths), 300
    z = torch.randn(n, total, generator=g, dtype=torch.float64) @ torch.randn(total, total, generator=g,
                                                                               dtype=torch.float64)
    w = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.1
    wo = torch.randn(9, total, generator=g, dtype=torch.float64)
    starts = [0, *itertools.accumulate(widths)]
    cols = [torch.arange(starts[u], starts[u + 1]) for u in range(len(widths))]
    grams = (z[:140].T @ (z[:140] * w[:140]), z[140:].T @ (z[140:] * w[140:]))
    order = [5, 0, 7, 2, 3, 6, 1, 4]
    chain = [frozenset(order[:k]) for k in range(1, len(order) + 1)]
    want = prune_errors(grams, wo, cols, chain, rho, n, fixed_ridge=True)
    got = nested_prune_errors(grams, wo, widths, order, rho)
    scale = want[chain[-1]] * n
    assert got[0] == pytest.approx(0.0, abs=1e-10 * scale)  # nothing pruned: nothing to refit
    for s, e in zip(chain, got[1:], strict=True):
        assert e == pytest.approx(want[s] * n, rel=1e-8, abs=1e-10 * scale)


@pytest.mark.parametrize("rho", [1e-2, 1.0, 1e3])
def test_nested_errors_with_a_base_are_the_token_refits(rho):
    """Columns z that are not the ones the target z0 wo' was made from (a basis-projected layer): each prefix
    of the chain pruned, the other columns refitted by ridge toward wo on one fold's tokens at the whole
    fold Gram's ridge, the error measured on the other fold's tokens, against the downdated errors."""
    g = torch.Generator().manual_seed(11)
    widths = [3, 4, 3, 5, 2, 4, 3]
    total, n, hidden, split = sum(widths), 260, 10, 120
    mix = torch.randn(total, total, generator=g, dtype=torch.float64)
    z0 = torch.randn(n, total, generator=g, dtype=torch.float64) @ mix
    z = z0 + 0.3 * torch.randn(n, total, generator=g, dtype=torch.float64) @ mix  # the projected columns
    w = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.1
    wo = torch.randn(hidden, total, generator=g, dtype=torch.float64)
    starts = [0, *itertools.accumulate(widths)]
    order = [4, 1, 6, 0, 3, 5, 2]
    folds = (slice(0, split), slice(split, n))
    e = z0 - z
    grams = tuple(z[f].T @ (z[f] * w[f]) for f in folds)
    base = tuple((z[f].T @ (e[f] @ wo.T * w[f]), float(((e[f] @ wo.T) ** 2 * w[f]).sum())) for f in folds)
    got = nested_prune_errors(grams, wo, widths, order, rho, base=base)
    assert len(got) == len(order) + 1
    for k in range(len(order) + 1):
        kept = torch.cat([torch.arange(starts[u], starts[u + 1]) for u in range(len(widths))
                          if u not in order[:k]] or [torch.zeros(0, dtype=torch.long)])
        want = 0.0
        for fa, fb in (folds, folds[::-1]):
            target_a, target_b = z0[fa] @ wo.T, z0[fb] @ wo.T
            za, zb = z[fa][:, kept], z[fb][:, kept]
            lam = rho * float((z[fa].T @ (z[fa] * w[fa])).diagonal().mean())
            m = wo[:, kept].T
            # min over x of |target_a - za x|_w^2 + lam |x - m|^2
            x = torch.linalg.solve(za.T @ (za * w[fa]) + lam * torch.eye(len(kept), dtype=z.dtype),
                                   za.T @ (target_a * w[fa]) + lam * m)
            want += float(((target_b - zb @ x) ** 2 * w[fb]).sum())
        assert got[k] == pytest.approx(want, rel=1e-8)
    # choiceshare computes the chain in float32 (`CHAIN_DTYPE`): the same errors to float32's precision, and the
    # steps between consecutive subsets, which the choice reads, in the same order
    low = nested_prune_errors(grams, wo, widths, order, rho, base=base, dtype=torch.float32)
    assert low == pytest.approx(got, rel=1e-4) and low != got  # close, and computed another way
    steps = [b - a for a, b in itertools.pairwise(got)]
    assert sorted(range(len(steps)), key=steps.__getitem__) == sorted(
        range(len(steps)), key=[b - a for a, b in itertools.pairwise(low)].__getitem__)


def test_heldout_prune_costs_take_the_nested_path_for_the_greedys_subsets(monkeypatch):
    U = 8  # > EXHAUSTIVE
    feats, cols, w = random_layer(U, 3, 8, 160, 12)
    gram = LayerGram(feats, cols, w)
    layout, data = SimpleNamespace(units_per_layer=U), SimpleNamespace(w=w)
    chain = [frozenset(s) for s in candidate_subsets(gram, U, 1.0)]
    got = heldout_prune_costs(gram, chain, data, layout, 1.0, 4)
    z = torch.cat([feats[("own", u)].double() for u in range(U)], 1)
    wo = torch.cat([cols[("own", u)] for u in range(U)], 1)
    blocks = [torch.arange(3 * u, 3 * u + 3) for u in range(U)]
    want = prune_errors(fold_grams(z, w, half(160, 4)), wo, blocks, chain, 1.0, 160, fixed_ridge=True)
    assert list(got) == chain
    # the chain computes in `CHAIN_DTYPE` (float32): float64's errors to float32's precision; in float64, to 1e-8
    assert list(got.values()) == pytest.approx(list(want.values()), rel=1e-4)
    monkeypatch.setattr(lstsq, "CHAIN_DTYPE", torch.float64)
    exact = heldout_prune_costs(gram, chain, data, layout, 1.0, 4)
    assert list(exact.values()) == pytest.approx(list(want.values()), rel=1e-8) and exact != got
    # subsets that are not nested keep each subset's own ridge
    loose = [frozenset({0}), frozenset({1}), frozenset({0, 2})]
    own = prune_errors(fold_grams(z, w, half(160, 4)), wo, blocks, loose, 1.0, 160)
    assert list(heldout_prune_costs(gram, loose, data, layout, 1.0, 4).values()) == pytest.approx(
        list(own.values()), rel=1e-9)


# --- the fits and the knapsack on tiny models ---------------------------------------------------------------

def test_layer_costs_match_a_direct_fit_on_the_full_outputs(tiny_tokenizer, calib_file, tiny_model):
    model = tiny_model("llama-mha", seed=1)  # 3 layers x 4 units
    layout = layout_of(model.config)
    data = capture(model, calibration_ids(model, tiny_tokenizer, calib_file, 128))
    d, bl, U = data[2], blocks(model), layout.units_per_layer
    sources = [(0, 1), (1, 2), (1, 3)]
    options = layer_options(layer_gram(model, data[2], layout, 2, sources), U, sources, rho=1e-2, min_gain=0.0)
    pruned_only = layer_options(layer_gram(model, data[2], layout, 2, []), U, [], rho=1e-2, min_gain=0.0)
    assert len(options) == 2 ** U - 1
    zb = borrowed_z(model, data[2], layout, 2, sources)
    for removed in [(0,), (1, 3), (0, 1, 2, 3)]:
        kept = [u for u in range(U) if u not in removed]
        v = sum(unit_z(d.z, layout, u) @ o_columns(bl[2], layout, u).T for u in removed)
        fit = RidgeResidual(torch.cat([unit_z(d.z, layout, u) for u in kept], 1) if kept else None, d.w, 1e-2)
        assert pruned_only[frozenset(removed)][0] == pytest.approx(fit.inner(v, v) / v.shape[0], rel=1e-4)
        cost, prune, ranked = options[frozenset(removed)]
        assert prune == pytest.approx(pruned_only[frozenset(removed)][0])
        lent = [ranked[u][0][1] for u in removed]
        ys = [zb[s] @ o_columns(bl[s[0]], layout, s[1]).T for s in lent]
        a = fit_scales(fit, v, ys)
        left = v - sum(ai * y for ai, y in zip(a.tolist(), ys, strict=True))
        assert cost == pytest.approx(fit.inner(left, left) / v.shape[0], rel=1e-3, abs=1e-9)
        assert cost <= pruned_only[frozenset(removed)][0] + 1e-12


def test_heldout_pruning_costs_fit_on_one_half_and_measure_on_the_other(tiny_tokenizer, calib_file,
                                                                        tiny_model):
    model = tiny_model("llama-mha", seed=2)
    layout = layout_of(model.config)
    ids = calibration_ids(model, tiny_tokenizer, calib_file, 128)  # 2 sequences of 64
    data, U = capture(model, ids), layout.units_per_layer
    d, gram = data[1], layer_gram(model, data[1], layout, 1, [])

    def held(rho):  # no lender: the cross-fitted cost of pruning each subset
        return heldout_share_costs(gram, layer_options(gram, U, [], rho, math.inf), d, layout, rho, len(ids), math.inf)

    cols = [o_columns(blocks(model)[1], layout, u) for u in range(U)]
    removed, kept = (1, 2), [0, 3]
    zs = [unit_z(d.z, layout, u) for u in range(U)]
    v = sum(zs[u] @ cols[u].T for u in removed)
    zk = torch.cat([zs[u] for u in kept], 1)
    halves = [slice(0, 64), slice(64, 128)]
    want = 0.0
    for a, b in ((0, 1), (1, 0)):
        fit = RidgeResidual(zk[halves[a]], d.w[halves[a]], 1.0)
        left = v[halves[b]] - zk[halves[b]] @ fit.solve(v[halves[a]])
        want += float((left * left * d.w[halves[b]]).sum())
    assert held(1.0)[frozenset(removed)] == pytest.approx(want / 128, rel=1e-6)
    # an enormous ridge means no refit: the cost is then the removed units' plain weighted output energy
    assert held(1e12)[frozenset(removed)] == pytest.approx(float((v * v * d.w).sum()) / 128, rel=1e-6)


def test_heldout_lenders_keep_a_real_source_and_drop_noise():
    """A borrowed output that explains the target is kept; one that only fits noise in-sample is not."""
    g = torch.Generator().manual_seed(0)
    n, d = 400, 6
    w = torch.ones(n, 1, dtype=torch.float64)
    kz = torch.randn(n, 3, generator=g, dtype=torch.float64)
    useful = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = 0.7 * useful + kz @ torch.randn(3, d, generator=g, dtype=torch.float64) \
        + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    assert heldout_lenders(kz, v, w, {"useful": useful, "noise": noise}, 1e-6, n // 2) == ["useful"]
    assert heldout_lenders(None, v, w, {"noise": noise}, 1e-6, n // 2) == []


def test_knapsack_is_optimal_and_exact():
    gen = torch.Generator().manual_seed(0)
    costs = []
    for _ in range(4):
        c = {}
        for k in (1, 2, 3):
            for s in itertools.combinations(range(3), k):
                c[frozenset(s)] = float(torch.rand(1, generator=gen)) * k
        costs.append(c)
    for n in range(0, 13):
        chosen = knapsack(costs, n)
        assert len(chosen) == n
        total = sum(costs[lay][frozenset(u for ly, u in chosen if ly == lay)] for lay in {ly for ly, _ in chosen})
        options = [[frozenset()] + list(c) for c in costs]
        best = min(sum(costs[i][s] for i, s in enumerate(combo) if s)
                   for combo in itertools.product(*options) if sum(len(s) for s in combo) == n)
        assert total == pytest.approx(best)


def test_selection_on_many_units_a_layer_weighs_nested_subsets(tiny_tokenizer, tiny_llama):
    """With more units a layer than `EXHAUSTIVE` the knapsack sees nested subsets, one per size."""
    model = tiny_llama(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    ids = torch.randint(4, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    layout = layout_of(model.config, "query")
    gram = layer_gram(model, capture(model, ids)[1], layout, 1, [])
    assert layout.units_per_layer == 8 > EXHAUSTIVE
    subsets = candidate_subsets(gram, 8, 1.0)
    assert [len(s) for s in subsets] == list(range(1, 9))
    assert all(set(a) < set(b) for a, b in zip(subsets, subsets[1:], strict=False))
    plan = headshare.make_plan(model, 0.25, "fitprune", unit="query", tokenizer=tiny_tokenizer, calib_tokens=256)
    assert len(plan.pruned) == 4


def test_crossfit_ridge_refits_where_it_generalises_and_not_where_it_fits_noise():
    g = torch.Generator().manual_seed(0)
    n, k = 64, 24
    kz = torch.randn(n, k, generator=g, dtype=torch.float64)
    w = torch.ones(n, 1, dtype=torch.float64)
    # the target is the kept units' output under other columns: a refit recovers it on either half
    signal = kz @ torch.randn(k, 3, generator=g, dtype=torch.float64)
    rho, lent = crossfit_ridge(kz, signal, w, {}, n // 2, (0.1, 1.0, 10.0))
    assert rho == 0.1 and lent == []
    # noise the kept units cannot explain: 24 columns fitted on 32 tokens with a weak ridge only make the other
    # half worse
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    rho, lent = crossfit_ridge(kz, noise, w, {}, n // 2, (0.01, 0.1))
    assert rho is None and lent == []
    # a borrower whose output is the target pays off held out, with or without the refit
    rho, lent = crossfit_ridge(kz, noise, w, {7: noise.clone()}, n // 2, (0.01, 0.1))
    assert lent == [7]


@pytest.mark.parametrize("bias", [False, True])
def test_refit_moments_give_the_token_refit_and_its_crossfit_in_any_chunks(bias):
    # a refit without borrowers from the folds' sufficient statistics: the same columns as the refit on the
    # tokens (`RidgeResidual`), the same cross-fitted choice as `crossfit_ridge`, whatever the chunk size
    g = torch.Generator().manual_seed(3)
    n, width, hidden = 96, 12, 5
    z = torch.randn(n, width, generator=g)  # float32, as the edited stream's o input is
    idx = torch.tensor([0, 1, 2, 6, 7, 8])  # two kept units of three features
    wk = torch.randn(hidden, len(idx), generator=g, dtype=torch.float64)
    a = (z.double()[:, idx] @ torch.randn(len(idx), hidden, generator=g, dtype=torch.float64)
         + 0.3 * torch.randn(n, hidden, generator=g, dtype=torch.float64)).float()
    b = torch.randn(hidden, generator=g, dtype=torch.float64) if bias else None
    w = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5
    kz = z.double()[:, idx]
    v = a.double() - (b if bias else 0.0) - kz @ wk.T
    split = 40
    for chunk in (7, 16384):
        folds = [refit_moments(z, idx, a, wk, w, part, b if bias else None, chunk=chunk)
                 for part in (slice(0, split), slice(split, n))]
        full = ridge_from_moments(folds[0][0] + folds[1][0], folds[0][1] + folds[1][1], 0.5)
        assert torch.allclose(full, RidgeResidual(kz, w, 0.5).solve(v), rtol=1e-10, atol=1e-12)
        assert folds[0][2] + folds[1][2] == pytest.approx(float((v ** 2 * w).sum()), rel=1e-12)
        for ridges in ((0.1, 1.0, 10.0), (1e-4,), (1e6,)):
            assert crossfit_moments(folds, ridges) == crossfit_ridge(kz, v, w, {}, split, ridges)[0]
    # noise the kept columns cannot explain: no refit is chosen, as on the tokens
    noise = torch.randn(n, hidden, generator=g).float()
    folds = [refit_moments(z, idx, noise, torch.zeros_like(wk), w, part) for part in (slice(0, split), slice(split, n))]
    assert crossfit_moments(folds, (1e-3,)) is None
    assert crossfit_ridge(kz, noise.double(), w, {}, split, (1e-3,))[0] is None
