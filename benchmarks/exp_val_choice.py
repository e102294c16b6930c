"""Which text should autoshare choose its candidate on? Every candidate plan (sharing and pruning) at each
ratio, its held-out loss on several validation texts, and its perplexity in and out of domain.

autoshare keeps the candidate with the least `held_out_loss` on its validation text. This makes each
candidate's plan once (the same plan autoshare would make: `candidate_ratio` of the same parameter budget,
fitted on the same calibration tokens), scores it with the same function on each validation text, and
evaluates it on the eval halves. The table then says, for each validation text, which candidate it picks
and what that pick costs on each evaluation text: the choice autoshare would make with `-o val=TEXT` and
`-o candidates=...`, without running autoshare once per combination.

    python benchmarks/exp_val_choice.py --ratios 0.3,0.5 --candidates choiceshare@query,basisshare@kv,prune@kv,fitprune@kv \
        --crossfit --threads 2 --json benchmarks/results/val_choice_smollm2.json

Plans are cached next to the JSON (`<json>.plans/`), rows are appended as they finish, and a rerun resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from headshare.arch import layout_of
from headshare.evaluate import IN_AND_OUT, perplexities
from headshare.fetch import load_model
from headshare.methods import METHODS, make_config, make_plan
from headshare.methods.auto import AutoShareConfig, candidate_ratio, parse_candidates, validation_ids
from headshare.methods.calibration import held_out_loss
from headshare.plan import SharePlan, units_for_ratio
from headshare.sharing import share

CANDIDATES = "choiceshare@query,basisshare@kv,prune@kv,prune@query,fitprune@kv,fitprune@query"
VALS = ("", "code", "news", "code+news")  # "" = the calibration text after calib_tokens (autoshare's default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--candidates", default=CANDIDATES)
    ap.add_argument("--calib", default="builtin:calib")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--crossfit", action="store_true", help="candidates with a refit cross-fit its ridge")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.json)
    plans_dir = out.with_suffix(".plans")
    plans_dir.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["ratio"], r["candidate"]) for r in rows}

    model, tok = load_model(args.model)
    layout = layout_of(model.config, "kv")
    vals = {v: validation_ids(tok, AutoShareConfig(ratio=0.3, calib=args.calib, calib_tokens=args.calib_tokens,
                                                   val=v)) for v in VALS}
    for ratio in (float(r) for r in args.ratios.split(",")):
        budget = units_for_ratio(ratio, layout) * layout.unit_params()
        for method, unit in parse_candidates(args.candidates):
            name = f"{method}@{unit}"
            if (ratio, name) in done:
                continue
            path = plans_dir / f"{ratio}-{method}-{unit}.json"
            t0 = time.perf_counter()
            if path.exists():
                plan, seconds = SharePlan.load(path), None
            else:
                extra = {"crossfit": True} if args.crossfit and "crossfit" in METHODS[method].config.options() else {}
                cfg = make_config(method, candidate_ratio(model, budget, unit), unit=unit, calib=args.calib,
                                  calib_tokens=args.calib_tokens, **extra)
                plan = make_plan(model, cfg, tokenizer=tok, progress=True)
                seconds = round(time.perf_counter() - t0, 1)
                plan.save(path)
            losses = {v or "calib-after": round(held_out_loss(model, ids, plan), 6) for v, ids in vals.items()}
            shared = share(copy.deepcopy(model), plan)
            ppl = perplexities(shared, tok, max_tokens=args.max_tokens)
            del shared
            rows.append({"model": args.model, "ratio": ratio, "candidate": name, "plan_ratio": plan.ratio,
                         "val_loss": losses, "perplexity": ppl, "plan_s": seconds,
                         "loadavg_1min": round(os.getloadavg()[0], 2), "calib": args.calib,
                         "calib_tokens": args.calib_tokens, "max_tokens": args.max_tokens,
                         "crossfit": args.crossfit})
            out.write_text(json.dumps(rows, indent=1))
            print(name, ratio, losses, {k: round(v, 2) for k, v in ppl.items()}, flush=True)
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Per ratio: each validation text's pick and the pick's perplexity on every evaluation text."""
    lines = ["| ratio | chosen on | pick | " + " | ".join(IN_AND_OUT) + " |", "|---" * (3 + len(IN_AND_OUT)) + "|"]
    for ratio in sorted({r["ratio"] for r in rows}):
        group = [r for r in rows if r["ratio"] == ratio]
        for v in [*(v or "calib-after" for v in VALS), *(f"oracle:{t}" for t in IN_AND_OUT)]:
            if v.startswith("oracle:"):
                pick = min(group, key=lambda r: r["perplexity"][v[7:]])
            else:
                pick = min(group, key=lambda r: r["val_loss"][v])
            lines.append(f"| {ratio} | {v} | {pick['candidate']} | "
                         + " | ".join(f"{pick['perplexity'][t]:.2f}" for t in IN_AND_OUT) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
