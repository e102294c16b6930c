"""PostShare on SmolLM2-135M: post-train with the constraint and share, against the references.

Rows (all at one sharing ratio, one plan made by --method before any training):
- original:        the model as fetched, no training, no sharing
- directshare:     the plan applied to the original weights (the paper's DirectShare, no training)
- postshare:       train with (1 - lambda) LM + lambda L_w, then share
- share-then-tune: share first, then train the tied model (LM loss only)
- tune-only:       the same training, no constraint, no sharing (what the training text alone does)

Training text: the built-in corpus's calib half; perplexity: its eval half (never trained on), the
same first --eval-tokens tokens for every row. Each mode appends to --results, so modes can run in
separate invocations; --report turns the results into Markdown rows and a loss-curve plot.

    python benchmarks/bench_posttrain.py --modes original directshare          # minutes
    python benchmarks/bench_posttrain.py --modes postshare --steps 200           # one training run
    python benchmarks/bench_posttrain.py --report                                # table + plot

The code is device-agnostic: on a CUDA machine the model and training move to the GPU (bf16 mixed
precision where supported) with no change to the command.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import headshare
from headshare.data import load_text
from headshare.evaluate import perplexity
from headshare.fetch import load_model
from headshare.posttrain import PostTrainConfig, posttrain, training_blocks

ROOT = Path(__file__).resolve().parent.parent
MODES = ("original", "directshare", "postshare", "share-then-tune", "tune-only")
TRAINED = ("postshare", "share-then-tune", "tune-only")
RECIPE = ("steps", "batch_size", "block_size", "lr", "warmup_steps", "device", "data")  # what makes two runs comparable


_BLOCKS: dict[tuple, torch.Tensor] = {}


def cached_blocks(tok, data: str, block_size: int) -> torch.Tensor:
    """`training_blocks`, tokenised once per process for all modes (pydoc is millions of tokens)."""
    key = (tok.name_or_path, len(tok), data, block_size)
    if key not in _BLOCKS:
        _BLOCKS[key] = training_blocks(tok, data, block_size)
    return _BLOCKS[key]


def run_mode(mode: str, args) -> dict:
    model, tok = load_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # plans never edit the model: postshare trains the original weights, and only sharing applies fitted ones
    plan = None if mode in ("original", "tune-only") else headshare.make_plan(model, args.ratio, args.method,
                                                                               tokenizer=tok)
    row = {"mode": mode, "tag": args.tag, "ratio": args.ratio, "method": args.method if plan else None,
           "units_shared": plan.units_removed if plan else 0}
    t0 = time.time()
    if mode == "directshare":
        headshare.share(model, plan)
    elif mode in TRAINED:
        out = Path(args.work) / (mode + (f"-{args.tag}" if args.tag else ""))
        cfg = PostTrainConfig(mode=mode, lam=args.lam, lr=args.lr, steps=args.steps, block_size=args.block_size,
                              batch_size=args.batch_size, seed=args.seed, save_steps=args.steps, out=str(out),
                              warmup_steps=args.warmup_steps, constraint=args.constraint, parts=args.parts,
                              pull_until=args.pull_until,
                              force=True, progress=False)
        model = posttrain(model, tok, plan, cached_blocks(tok, args.data, args.block_size), cfg)
        rec = json.loads((out / "posttrain.json").read_text())
        row.update(steps=rec["steps"], block_size=args.block_size, batch_size=args.batch_size, lr=args.lr,
                   warmup_steps=args.warmup_steps, parts=args.parts if mode == "postshare" else None,
                   constraint=args.constraint if mode == "postshare" else None, data=args.data,
                   pull_until=args.pull_until if mode == "postshare" and args.constraint == "prox" else None,
                   lam=rec["effective_lambda"], train_seconds=rec["train_seconds"], out=str(out),
                   final_lm_loss=rec["final_lm_loss"], pair_distance_before=rec["mean_pair_distance_fro_before"],
                   pair_distance_after=rec["mean_pair_distance_fro_after"], device=rec["device"])
    row["prepare_seconds"] = round(time.time() - t0, 1)
    model.to(device).eval()
    params, _ = headshare.unique_parameters(model)
    ev = perplexity(model, tok, load_text("builtin", split="eval"), window=512, stride=512,
                    max_tokens=args.eval_tokens, progress=False)
    row.update(params=params, perplexity=round(ev["perplexity"], 4), eval_tokens=ev["tokens"],
               eval_seconds=round(ev["seconds"], 1), torch_threads=torch.get_num_threads())
    return row


def report(results: dict, plot: Path, states: Path | None = None, tag: str = "") -> str:
    rows = results["rows"]
    lines = ["| row | units removed (shared + pruned) | params | training (steps x batch x block, lr, lambda, time) | perplexity (eval) "
             "| x tune-only (same recipe) | mean pair distance before -> after |",
             "|---|---|---|---|---|---|---|"]
    for key, r in sorted(rows.items(), key=lambda kv: (MODES.index(kv[1]["mode"]), kv[1].get("tag") or "")):
        mode, row_tag = r["mode"], r.get("tag") or ""
        # the reference is the tune-only run with the same recipe (untrained rows: the one with the same tag)
        ref = next((t["perplexity"] for t in rows.values() if t["mode"] == "tune-only" and "steps" in r
                    and all(t.get(k) == r.get(k) for k in RECIPE)), None)
        if ref is None and "steps" not in r:  # untrained rows: the tune-only row whose tag begins theirs
            refs = [t for t in rows.values() if t["mode"] == "tune-only" and row_tag.startswith(t.get("tag") or "")]
            ref = max(refs, key=lambda t: len(t.get("tag") or ""))["perplexity"] if refs else None
        if r.get("constraint") == "prox":
            parts = f", prox pull over {r.get('pull_until') or 1:.0%} of the steps"
        else:
            parts = f", L_w on {r['parts']}" if r.get("parts") else ""
        if r.get("method") not in (None, "directshare"):
            parts += f", plan {r['method']}"
        train = (f"{r['steps']} x {r['batch_size']} x {r['block_size']}, lr {r['lr']:g}, lambda {r['lam']:g}{parts}, "
                 f"{r['train_seconds'] / 60:.1f} min" if "steps" in r else "-")
        dist = (f"{r['pair_distance_before']:.3f} -> {r['pair_distance_after']:.3f}"
                if r.get("pair_distance_after") is not None else "-")
        rel = f"{r['perplexity'] / ref:.3f}" if ref else "-"
        units = f"{r['units_shared']}" if mode != "original" and mode != "tune-only" else "0"  # shared + pruned
        lines.append(f"| {key} | {units} | {r['params']:,} | {train} | {r['perplexity']:.3f} | {rel} | {dist} |")
    _plot(rows, plot, states, tag)
    return "\n".join(lines)


def _state_file(row: dict, states: Path | None) -> Path | None:
    """The run's trainer_state.json: copied to STATES/<output name>.json, or else in its output directory."""
    f = states / f"{Path(row['out']).name}.json" if states else Path(row["out"], "trainer_state.json")
    return f if f.is_file() else None


def _smooth(y: list[float], n: int = 10) -> list[float]:
    """Trailing mean over n logged steps: per-step LM losses of single batches are too noisy to compare."""
    return [sum(y[max(0, i - n + 1): i + 1]) / len(y[max(0, i - n + 1): i + 1]) for i in range(len(y))]


def _plot(rows: dict, path: Path, states: Path | None = None, tag: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    trained = [(k, r, _state_file(r, states)) for k, r in rows.items()
               if r["mode"] in TRAINED and (r.get("tag") or "").startswith(tag)]
    trained = [(k, r, f) for k, r, f in trained if f is not None]
    for i, (key, r, state) in enumerate(trained):
        ls = "--" if r["mode"] == "tune-only" else "-"  # tune-only's LM curve lies on top of postshare's
        hist = [h for h in json.loads(state.read_text())["log_history"] if "lm_loss" in h]
        a.plot([h["step"] for h in hist], _smooth([h["lm_loss"] for h in hist]), lw=0.8, ls=ls, label=key,
               color=f"C{i}")
        c = [h for h in hist if "constraint_loss" in h]
        if c:
            b.plot([h["step"] for h in c], [h["constraint_loss"] for h in c], lw=0.8, ls=ls, label=key, color=f"C{i}")
    a.set(xlabel="step", ylabel="LM loss (train, mean of 10 steps)", title="LM loss")
    b.set(xlabel="step", ylabel="mean Frobenius distance, q+k+v", title="pair distance (= L_w for the fro constraint)")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--method", default="directshare")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--lambda", dest="lam", type=float, default=0.5)
    ap.add_argument("--constraint", default="fro", choices=["fro", "mse", "prox"])
    ap.add_argument("--pull-until", type=float, default=1.0, help="prox: fraction of the steps the pull takes")
    ap.add_argument("--data", default="builtin:calib", help="training text (calib split): builtin:calib, pydoc, a file")
    ap.add_argument("--parts", default="qkv", choices=["qkv", "qkvo"], help="what L_w pulls together (postshare)")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    # 1 thread: on this shared 2-core machine, 2 threads ran a SmolLM2 step 5x slower than 1 (spinning
    # OpenMP threads fight the other users' processes)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="row label suffix for variants, e.g. lr1e-3")
    ap.add_argument("--work", default="/tmp/headshare-bench-posttrain", help="checkpoints of the trained modes")
    ap.add_argument("--results", default=str(ROOT / "docs" / "posttrain" / "results.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "posttrain" / "loss_curves.png"))
    ap.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    ap.add_argument("--plot-tag", default="", help="plot only the runs whose tag begins with this")
    ap.add_argument("--states", default=None, help="a folder of <output name>.json trainer states (runs made elsewhere)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    if not args.report:
        for mode in args.modes:
            t0 = time.time()
            row = run_mode(mode, args)
            row["wall_seconds"] = round(time.time() - t0, 1)
            results["rows"][mode + (f" ({args.tag})" if args.tag else "")] = row
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(row), flush=True)
    print(report(results, Path(args.plot), Path(args.states) if args.states else None, args.plot_tag))


if __name__ == "__main__":
    main()
