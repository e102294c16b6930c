"""Does calibrating on more tokens, or on more than one kind of text, make the refits hold off the calibration
text? Each method at one ratio on SmolLM2, calibrated on each (source, tokens), perplexity on three texts
(the built-in docstrings, English news, Python code; first --max-tokens of each eval half). --ratio counts
key/value units; a METHOD@query runs at the query-head ratio that removes as many parameters, as autoshare's
candidates do.

    python benchmarks/exp_calib_size.py benchmarks/results/calib_size_smollm2.json \
        --methods fitprune,choiceshare@query --calib pydoc --tokens 4096,16384,65536
    python benchmarks/exp_calib_size.py benchmarks/results/calib_size_smollm2.json --resume \
        --methods fitprune,choiceshare@query --calib builtin:calib+news:calib --tokens 16384,65536

`--calib pydoc` takes the calibration half of the docstrings of the installed scientific packages (about 4
million SmolLM2 tokens, the same kind of text as the built-in corpus, whose calibration half has about 41k),
so the size can grow past what the built-in corpus holds; which packages are installed decides its text.
Rows are appended to the JSON as they finish; --resume skips the rows there.
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
from headshare.plan import units_for_ratio
from headshare.sharing import unique_parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="fitprune,choiceshare@query", help="METHOD or METHOD@UNIT, comma list")
    ap.add_argument("--calib", default="pydoc")
    ap.add_argument("--tokens", default="4096,16384,65536", help="calibration tokens, comma list")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="keep the rows in JSON and add the missing ones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.json)
    rows: list[dict] = json.loads(out.read_text()) if args.resume and out.exists() else []
    done = {(r["method"], r["calib"], r["calib_tokens"], r["ratio"]) for r in rows}
    model, tok = load_model(args.model)

    def score(m) -> dict:
        return perplexities(m, tok, max_tokens=args.max_tokens, digits=3)

    # --ratio counts key/value units; a METHOD@query gets the query-head ratio that removes as much (as in autoshare)
    kv = layout_of(model.config, "kv")
    budget = units_for_ratio(args.ratio, kv) * kv.unit_params()
    if ("original", "", 0, 0.0) not in done:
        rows.append({"method": "original", "calib": "", "calib_tokens": 0, "ratio": 0.0, "ppl": score(model)})
        print(rows[-1], flush=True)
    for n in (int(t) for t in args.tokens.split(",")):
        for method in args.methods.split(","):
            if (method, args.calib, n, args.ratio) in done:
                continue
            name, _, unit = method.partition("@")
            kw = {"unit": unit} if unit else {}
            ratio = candidate_ratio(model, budget, unit) if unit and unit != "kv" else args.ratio
            t0 = time.time()
            cfg = make_config(name, ratio, calib=args.calib, calib_tokens=n, **kw)
            plan = headshare.make_plan(model, cfg, tokenizer=tok)
            plan_s = time.time() - t0
            shared = headshare.share(copy.deepcopy(model), plan)
            rows.append({"method": method, "calib": args.calib, "calib_tokens": n, "ratio": args.ratio,
                         "method_ratio": ratio,
                         "params_removed": unique_parameters(model)[0] - unique_parameters(shared)[0],
                         "ppl": score(shared), "plan_s": round(plan_s), "units_pruned": len(plan.pruned),
                         "units_shared": len(plan.assignments)})
            print(rows[-1], flush=True)
            out.write_text(json.dumps(rows, indent=1))
            del shared
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
