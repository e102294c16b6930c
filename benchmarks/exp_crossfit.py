"""Does cross-fitting the refit's ridge help off the calibration text? fitprune with `crossfit=True` (ridge
chosen per layer, no refit where none pays off held out) against the fixed ridge, on SmolLM2, calibrated on a
mix of two kinds of text (so the two folds are the two kinds), perplexity on three texts.

    python benchmarks/exp_crossfit.py benchmarks/results/crossfit_smollm2.json \
        --calib builtin:calib+news:calib --calib-tokens 8192 --ratios 0.3,0.5

A fixed-ridge row is skipped where cross-fitting chose rho 1 in every layer (the plans are then the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import headshare
from headshare.evaluate import perplexities
from headshare.fetch import load_model
from headshare.methods import make_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="builtin:calib+news:calib")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    rows: list[dict] = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for crossfit in (True, False):
            if not crossfit and all(v == 1.0 for v in rows[-1]["ridges"].values()):
                continue
            t0 = time.time()
            cfg = make_config("fitprune", ratio, calib=args.calib, calib_tokens=args.calib_tokens, crossfit=crossfit)
            plan = headshare.make_plan(model, cfg, tokenizer=tok)
            shared = headshare.share(copy.deepcopy(model), plan)
            ppl = perplexities(shared, tok, max_tokens=args.max_tokens, digits=3)
            rows.append({"calib": args.calib, "calib_tokens": args.calib_tokens, "ratio": ratio, "crossfit": crossfit,
                         "ridges": plan.notes["ridges"], "ppl": ppl, "s": round(time.time() - t0)})
            print(rows[-1], flush=True)
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
