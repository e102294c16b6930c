"""Time one direction of choiceshare's downdated chain (`lstsq.nested_prune_errors`, float32) on the random
statistics of a layer's shape that `bench_choice_costs.py` makes, and print its errors, so two versions of the code can be compared on the same
input (the old one through a worktree on PYTHONPATH):

    PYTHONPATH=OLD python benchmarks/bench_chain_direction.py --heads 32 --hidden 4096 --runs 1 > old.json
    python benchmarks/bench_chain_direction.py --heads 32 --hidden 4096 --runs 1 > new.json

Prints one JSON line: the seconds of each run and the errors of the nested subsets.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from bench_choice_costs import random_layer  # the same random statistics (benchmarks/ is on sys.path)

    from headshare.methods.basis.heldout import nested_stats
    from headshare.methods.lstsq import nested_prune_errors

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.tokens
    z0, z, w, wo = random_layer(args.heads, args.head_dim, args.hidden, n)
    folds = (slice(0, n // 2), slice(n // 2, n))
    grams, base = nested_stats(z, z0, w, wo, folds)
    order = list(range(args.heads - 1))
    times, errs = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        errs = nested_prune_errors(grams, wo, [args.head_dim] * args.heads, order, 1.0, base=base,
                                   directions=((0, 1),), dtype=torch.float32)
        times.append(round(time.perf_counter() - t, 3))
    print(json.dumps({"heads": args.heads, "hidden": args.hidden, "tokens": n, "threads": args.threads,
                      "seconds": times, "errors": errs}))


if __name__ == "__main__":
    main()
