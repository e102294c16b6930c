"""Does a short training after sharing hold quality off the calibration text? One plan (by default
choiceshare on query heads at the ratio that removes as many parameters as --ratio of the key/value units,
autoshare's pick on SmolLM2), shared, then trained (share-then-tune) on a text of the calibration's kind
with the LM loss, with distillation from the original model, or both; perplexity on three texts (the
built-in docstrings, English news, Python code; first --max-tokens of each eval half).

    python benchmarks/exp_heal.py benchmarks/results/heal_smollm2.json --plan /tmp/heal.plan.json --distill 0,1
    python benchmarks/exp_heal.py benchmarks/results/heal_smollm2.json --plan /tmp/heal.plan.json --resume \
        --mode tune-only --distill 0

`--plan PATH` keeps the plan there (made and saved on the first run, read on the next: plans with fitted
tensors are tens of MB, so keep them out of the repository). Rows are appended as they finish;
--resume skips the (mode, distill, steps, lr, data) rows already there. `--mode tune-only` trains the original
model the same way: what the training alone does, the reference for the shared rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import headshare
from headshare.arch import layout_of
from headshare.evaluate import perplexities
from headshare.fetch import load_model
from headshare.methods import make_config
from headshare.methods.auto import candidate_ratio
from headshare.plan import SharePlan, units_for_ratio
from headshare.posttrain import PostTrainConfig, posttrain
from headshare.sharing import unique_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="choiceshare@query", help="METHOD or METHOD@UNIT")
    ap.add_argument("--ratio", type=float, default=0.3, help="of the key/value units' parameters")
    ap.add_argument("--plan", help="read the plan from here if it exists, else make it and save it here")
    ap.add_argument("--data", default="pydoc", help="training text (its calib split)")
    ap.add_argument("--distill", default="0,1", help="distillation weights, comma list (0: LM loss only)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--warmup-steps", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", default="share-then-tune", choices=["share-then-tune", "tune-only"],
                    help="tune-only: the same training of the original model, the reference")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.json)
    rows: list[dict] = json.loads(out.read_text()) if args.resume and out.exists() else []
    done = {(r.get("mode", "share-then-tune"), r["distill"], r["steps"], r["lr"], r["data"]) for r in rows}
    model, tok = load_model(args.model)

    def save_rows() -> None:
        out.write_text(json.dumps(rows, indent=1) + "\n")

    def score(m) -> dict:
        return perplexities(m, tok, max_tokens=args.max_tokens, digits=3)

    if args.plan and Path(args.plan).exists():
        plan = SharePlan.load(args.plan)
    else:
        name, _, unit = args.method.partition("@")
        kv = layout_of(model.config, "kv")
        budget = units_for_ratio(args.ratio, kv) * kv.unit_params()
        ratio = candidate_ratio(model, budget, unit) if unit and unit != "kv" else args.ratio
        t0 = time.time()
        plan = headshare.make_plan(model, make_config(name, ratio, **({"unit": unit} if unit else {})), tokenizer=tok)
        print(f"plan {args.method} at {ratio}: {time.time() - t0:.0f} s", flush=True)
        if args.plan:
            plan.save(args.plan)
    if ("share-then-tune", "original", 0, 0.0, "") not in done:
        rows.append({"row": "original", "distill": "original", "steps": 0, "lr": 0.0, "data": "", "ppl": score(model)})
        print(rows[-1], flush=True)
        save_rows()
    if ("share-then-tune", "untrained", 0, 0.0, "") not in done:
        shared = headshare.share(copy.deepcopy(model), plan)
        rows.append({"row": plan.method, "distill": "untrained", "steps": 0, "lr": 0.0, "data": "",
                     "params_removed": unique_parameters(model)[0] - unique_parameters(shared)[0],
                     "ppl": score(shared)})
        print(rows[-1], flush=True)
        save_rows()
        del shared
    for d in (float(x) for x in args.distill.split(",")):
        if (args.mode, d, args.steps, args.lr, args.data) in done:
            continue
        cfg = PostTrainConfig(mode=args.mode, distill=d, steps=args.steps, block_size=args.block_size,
                              lr=args.lr, warmup_steps=args.warmup_steps, save_steps=10 ** 9, progress=False)
        t0 = time.time()
        trained = posttrain(copy.deepcopy(model), tok, plan, args.data, cfg)
        seconds = time.time() - t0
        rows.append({"row": "original + tune-only" if args.mode == "tune-only" else f"{plan.method} + share-then-tune",
                     "mode": args.mode, "distill": d, "steps": args.steps, "lr": args.lr,
                     "data": args.data, "block_size": args.block_size, "train_s": round(seconds),
                     "ppl": score(trained)})
        print(rows[-1], flush=True)
        save_rows()
        del trained


if __name__ == "__main__":
    main()
