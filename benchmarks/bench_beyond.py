"""Beyond the paper: calibration-based sharing against DirectShare and the baselines, on SmolLM2-135M.

For every (method, ratio) a fresh copy of the model gets the method's plan (timed: for the data-aware
methods that is the calibration), is shared with `headshare.share`, and is measured:

- perplexity on the held-out "eval" half of the built-in corpus (never seen by any calibration, which
  reads the "calib" half), 512-token windows, stride 512, the first `--max-tokens` tokens for every row;
- parameters removed, from `unique_parameters` (every method removes the same number of units, and none
  adds parameters, so all rows of a ratio remove the same number of parameters; the table shows it).

One control is not a registered method: `actshare-as-prune` prunes exactly the units that `actshare`
shares, which isolates what the fitted scale and the borrowed weights add. `fitprune` is the same kind of
control for `fitshare`. Rows are appended to the JSON file as they finish; `--resume` keeps them.

    python benchmarks/bench_beyond.py --json benchmarks/results/beyond.json --md benchmarks/results/beyond.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

METHODS = ("directshare", "random", "prune", "actshare", "fitshare", "fitprune", "basisshare")
CONTROL = "actshare-as-prune"


def run(args) -> list[dict]:
    """Rows through `headshare.bench.measure` (without the speed probe), appended to --json as they finish."""
    from headshare.bench import (
        SETTING_KEYS,
        CachedReference,
        bench_config,
        measure,
        read_rows,
        resolve_methods,
        write_rows,
    )
    from headshare.data import load_text
    from headshare.fetch import load_model
    from headshare.methods import make_plan
    from headshare.plan import SharePlan

    methods = resolve_methods(args.methods)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    out = Path(args.json)
    settings = {k: getattr(args, k, None) for k in SETTING_KEYS}
    rows = read_rows(out, settings, resume=args.resume, force=not args.resume)
    done = {(r["method"], r["ratio"]) for r in rows}
    original, tok = load_model(args.model)
    from headshare.sharing import unique_parameters

    total = unique_parameters(original)[0]
    for r in rows:  # a row without params_total: the same model, so the same total
        r.setdefault("params_total", total)
    reference = CachedReference(original)
    text = load_text(args.text, split="eval")

    def save(method, ratio, make=None):
        row = measure(method, ratio, original, reference, tok, text, settings, run_probe=False, progress=False,
                      make=make)
        rows.append(row)
        write_rows(out, rows)
        print(f"{method:>18} {ratio:.2f}  ppl {row['perplexity']:9.3f}  plan {row['plan_s']:6.1f}s  "
              f"params removed {row['params_removed']:,}", file=sys.stderr, flush=True)

    def as_prune(model):  # prune exactly the units actshare shares (its plan is made again, on this copy)
        plan = make_plan(model, bench_config("actshare", ratio, settings), tokenizer=tok)
        return SharePlan.from_dict({**plan.to_dict(), "method": CONTROL, "assignments": [],
                                    "pruned": [[a.layer, a.unit] for a in plan.assignments]})

    if ("original", 0.0) not in done:
        save("original", 0.0)
    for ratio in ratios:
        for method in methods:
            if (method, ratio) not in done:
                save(method, ratio)
            if method == "actshare" and (CONTROL, ratio) not in done:
                save(CONTROL, ratio, make=as_prune)
    return rows


def markdown(rows: list[dict]) -> str:
    """Perplexity per budget (rows: parameters removed; columns: methods), with x original, then plan
    seconds. Rows of query-head units ("METHOD@query") sit in the group that removes what they remove."""
    from headshare.bench import budget_groups, group_ratio

    base = next(r for r in rows if r["method"] == "original")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "original"))
    groups = budget_groups(rows)
    head = "| units removed | params removed (of model) | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    lines.append("| 0% | 0 | " + " | ".join(f"{base['perplexity']:.2f}" for _ in methods) + " |")
    for group in groups:
        cell = {r["method"]: r for r in group}
        got = [cell.get(m) for m in methods]
        removed = {r["params_removed"] for r in group}
        plain = [r for r in group if "@" not in r["method"]] or group
        units = max(r["units_removed"] for r in plain)  # basisshare prunes only part of its budget
        total = group[0]["params_total"]
        prm = ", ".join(f"{p:,} ({p / total:.1%})" for p in sorted(removed))
        vals = [f"{r['perplexity']:.2f} (x{r['perplexity'] / base['perplexity']:.2f})" if r else "" for r in got]
        lines.append(f"| {group_ratio(group):.0%} ({units}) | {prm} | " + " | ".join(vals) + " |")
    lines += ["", "Plan (calibration) seconds:", "", "| ratio | " + " | ".join(methods) + " |",
              "|" + "---|" * (len(methods) + 1)]
    for group in groups:
        cell = {r["method"]: r for r in group}
        lines.append(f"| {group_ratio(group):.0%} | "
                     + " | ".join(f"{cell[m]['plan_s']:.0f}" if m in cell else "" for m in methods) + " |")
    from headshare.bench import PRUNING, sharing_gap

    lines += ["", "Best method that shares against the best that only prunes (same parameters removed):", "",
              "| ratio | of model | best sharing | best pruning | sharing / pruning - 1 | sharing / original |",
              "|---|---|---|---|---|---|"]
    for g in sharing_gap(rows, pruning=PRUNING + (CONTROL,)):  # the control only prunes
        lines.append(f"| {g['ratio']:.0%} | {g['model_fraction']:.1%} | {g['sharing']} {g['sharing_ppl']:.2f} | "
                     f"{g['pruning']} {g['pruning_ppl']:.2f} | {g['gap']:+.1%} | "
                     f"x{g['sharing_ppl'] / base['perplexity']:.3f} |")
    tok = base["tokens"]
    loads = [r["loadavg_1min"] for r in rows]
    lines += ["", f"Perplexity on {tok:,} scored tokens of `{base['text']}` (eval half), window {base['window']}; "
                  f"1-minute load average during the rows {min(loads):.1f}-{max(loads):.1f} on 2 cores."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list, or 'all' (every registered method)")
    ap.add_argument("--text", default="builtin", help="evaluation text (its eval split)")
    ap.add_argument("--calib", default="builtin:calib", help="calibration text for data-aware methods")
    ap.add_argument("--max-tokens", type=int, default=8192, help="evaluate on the first N tokens (all rows)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--option", action="append", default=None, metavar="[METHOD.]KEY=VALUE",
                    help="a method option for every row whose method has it (repeatable), as `headshare bench -o`")
    ap.add_argument("--json", default="benchmarks/results/beyond.json")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    ap.add_argument("--plot", default=None, help="also write the sharing-vs-pruning curve (PNG) here")
    ap.add_argument("--merge", default=None, metavar="JSON,...",
                    help="rows of earlier runs (other settings, same model and eval text) to add to the table and "
                         "plot; this run's rows win where both have a (method, ratio)")
    ap.add_argument("--resume", action="store_true",
                    help="keep rows already in --json made with the same settings (else --json is replaced)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from headshare.bench import parse_options, resolve_methods

    args.options = parse_options(args.option, resolve_methods(args.methods))  # before any model is loaded
    rows = run(args)
    if args.merge:
        have = {(r["method"], r["ratio"]) for r in rows}
        for f in args.merge.split(","):
            rows += [r for r in json.loads(Path(f).read_text()) if (r["method"], r["ratio"]) not in have]
        total = next(r["params_total"] for r in rows if "params_total" in r)
        for r in rows:
            r.setdefault("params_total", total)
    table = markdown(rows)
    if args.md:
        Path(args.md).write_text(table)
    if args.plot:
        from headshare.bench import plot_rows

        plot_rows([r for r in rows if r["method"] != CONTROL], args.plot)
    print(table)
    return 0 if all(math.isfinite(r["perplexity"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
