"""Time choiceshare's held-out choice costs for one layer and one rank: the per-subset solves
(`basis.heldout.subset_errors`, one Cholesky of the kept columns and hidden-wide solves per subset and fold)
against the downdated chain (`lstsq.nested_prune_errors` with the projection's error as removed columns),
on random statistics of a layer's shape. choiceshare weighs (ranks + 1) x this per layer.

    python benchmarks/bench_choice_costs.py --heads 12 --head-dim 128 --hidden 1536            # Qwen2.5-1.5B
    python benchmarks/bench_choice_costs.py --heads 32 --head-dim 128 --hidden 4096 --no-old   # Llama-2-7B
    python benchmarks/bench_choice_costs.py --heads 32 --head-dim 128 --hidden 4096 --no-old --float32

Both paths see the same statistics; the script prints their largest difference (at the fixed ridge) as a check.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from headshare.methods.basis.heldout import fold_stats, nested_stats, subset_errors
from headshare.methods.lstsq import nested_prune_errors


def random_layer(heads: int, head_dim: int, hidden: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """(z0, z, w, wo) of a layer's shape, seeded: o inputs z0, a projected layer's o inputs z near them, unit
    token weights and an o weight (hidden, heads x head_dim) in float64."""
    g = torch.Generator().manual_seed(0)
    width = heads * head_dim
    mix = torch.randn(width, width, generator=g) / width ** 0.5
    z0 = torch.randn(tokens, width, generator=g) @ mix
    z = z0 + 0.2 * torch.randn(tokens, width, generator=g) @ mix
    wo = (torch.randn(hidden, width, generator=g) / width ** 0.5).double()
    return z0, z, torch.ones(tokens, 1), wo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-old", action="store_true", help="skip the per-subset solves (hours on a 7B layer)")
    ap.add_argument("--float32", action="store_true", help="also time the chain computing in float32")
    ap.add_argument("--json", help="append the result here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, U = args.tokens, args.heads
    z0, z, w, wo = random_layer(args.heads, args.head_dim, args.hidden, n)
    cols = [torch.arange(u * args.head_dim, (u + 1) * args.head_dim) for u in range(U)]
    order = list(range(U))
    subsets = [frozenset(order[:k]) for k in range(U + 1)]
    folds = (slice(0, n // 2), slice(n // 2, n))
    row = {"heads": U, "head_dim": args.head_dim, "hidden": args.hidden, "tokens": n, "threads": args.threads}

    def chain(dtype: torch.dtype) -> list[float]:
        errs = [0.0] * (U + 1)
        for f in (0, 1):  # each direction has columns of its own in choiceshare; here both see z
            grams, base = nested_stats(z, z0, w, wo, folds)
            one = nested_prune_errors(grams, wo, [args.head_dim] * U, order, 1.0, base=base,
                                      directions=((f, 1 - f),), dtype=dtype)
            errs = [a + b for a, b in zip(errs, one, strict=True)]
        return errs

    t = time.perf_counter()
    errs = chain(torch.float64)
    row["nested_s"] = time.perf_counter() - t
    print(f"downdated chain: {row['nested_s']:.1f} s for {U + 1} subsets x 2 folds", flush=True)
    if args.float32:
        t = time.perf_counter()
        e32 = chain(torch.float32)
        row["nested_float32_s"] = time.perf_counter() - t
        row["float32_max_diff_of_scale"] = max(abs(a - b) for a, b in zip(e32, errs, strict=True)) / max(errs)
        # what a choice reads: the steps between consecutive subsets, and whether their order holds
        steps64 = [b - a for a, b in itertools.pairwise(errs)]
        steps32 = [b - a for a, b in itertools.pairwise(e32)]
        row["float32_max_step_diff_of_smallest_step"] = (max(abs(a - b) for a, b in zip(steps32, steps64, strict=True))
                                                       / min(abs(x) for x in steps64))
        print(f"float32 chain: {row['nested_float32_s']:.1f} s ({row['nested_s'] / row['nested_float32_s']:.2f}x); "
              f"largest difference {row['float32_max_diff_of_scale']:.1e} of the largest cost, "
              f"{row['float32_max_step_diff_of_smallest_step']:.1e} of the smallest step between subsets",
              flush=True)
    if not args.no_old:
        t = time.perf_counter()
        a = z0.double() @ wo.T
        st = [fold_stats(z, a, w, f) for f in folds]
        old = subset_errors((st[0], st[1]), (st[1], st[0]), wo, cols, subsets, 1.0, n, fixed_ridge=True)
        row["per_subset_s"] = time.perf_counter() - t
        scale = max(old.values())
        row["max_diff_of_scale"] = max(abs(errs[len(s)] / n - old[s]) for s in subsets) / scale
        print(f"per-subset solves: {row['per_subset_s']:.1f} s; ratio {row['per_subset_s'] / row['nested_s']:.1f}x; "
              f"largest difference {row['max_diff_of_scale']:.1e} of the largest cost", flush=True)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
