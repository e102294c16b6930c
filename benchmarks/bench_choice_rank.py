"""Where one rank of choiceshare's held-out choice spends its time on a real checkpoint's first layer: the
attention call that gives the o inputs (plain, and with k and v replayed as `choice_costs` runs it), the
folds' statistics and one direction of the downdated chain. `choice_costs` does, per layer and rank, two
attention calls, two statistics and two chain directions.

    python benchmarks/bench_scale.py --layers 2 --methods directshare --cache /tmp/hs   # builds llama7b-L2
    python benchmarks/bench_choice_rank.py /tmp/hs/llama7b-L2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 2)


@torch.no_grad()
def main() -> None:
    from headshare.arch import blocks, layout_of
    from headshare.fetch import load_model
    from headshare.methods.basis.heldout import CHAIN_DTYPE, nested_stats
    from headshare.methods.calibration import calibration_ids, walk
    from headshare.methods.lstsq import nested_prune_errors

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    layout = layout_of(model.config, "query")
    ids = calibration_ids(model, tok, "builtin:calib", args.tokens)
    fixed = tuple(p.path for p in layout.layer_projections())
    q = layout.in_projections()[0].path
    op = layout.o_projection()
    row = {"model": args.model, "dtype": args.dtype, "tokens": args.tokens, "threads": args.threads}
    layers = walk(model, ids, "cpu")
    _, d = next(layers)  # the first block, on its turn
    block = blocks(model)[0]
    _, row["attention_plain_s"] = timed(lambda: d.attention_z(block, layout))
    _, row["attention_first_s"] = timed(lambda: d.attention_z(block, layout, fixed))
    block.get_submodule(q).weight.mul_(0.5)  # another q, as the next rank has
    z, row["attention_replayed_s"] = timed(lambda: d.attention_z(block, layout, fixed))
    block.get_submodule(q).weight.mul_(2.0)
    wo = block.get_submodule(op.path).weight.double()
    n = d.z.shape[0]
    folds = (slice(0, n // 2), slice(n // 2, n))
    (grams, base), row["statistics_s"] = timed(lambda: nested_stats(z, d.z, d.w, wo, folds))
    widths = [layout.head_dim] * layout.num_heads
    _, row["chain_direction_s"] = timed(lambda: nested_prune_errors(
        grams, wo, widths, list(range(layout.num_heads)), 1e-2, base=base, directions=((0, 1),), dtype=CHAIN_DTYPE))
    layers.close()
    row["rank_s"] = round(2 * (row["attention_replayed_s"] + row["statistics_s"] + row["chain_direction_s"]), 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
