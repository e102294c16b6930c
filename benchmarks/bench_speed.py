"""Does a shared SmolLM2 run as fast as the original, and is its weight memory really smaller?

Loads SmolLM2-135M twice (original and DirectShare at --ratio), then alternates the two models
run by run so that both see the same machine noise, and reports medians and their ratio:
- prefill: one forward pass over a 512-token prompt, no cache;
- decode: one-token steps with a KV cache after a 128-token prompt, the median step.
Weight memory: unique parameter bytes of each model in memory (every storage counted once) next to
the theoretical saving, units_shared x parameters per unit x bytes per parameter; and the resident
memory of a fresh process after loading each checkpoint.

    python benchmarks/bench_speed.py --ratio 0.3 --runs 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import headshare
from headshare.fetch import load_model, resolve_model


def _prefill(model, ids) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        model(ids, use_cache=False)
    return time.perf_counter() - t


def _decode_steps(model, ids, steps: int) -> list[float]:
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            t = time.perf_counter()
            out = model(nxt, cache=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    return times


def _rss_after_load(path: str) -> int:
    """VmRSS of a fresh process that has loaded `path` (bytes)."""
    code = (f"import headshare.fetch as f, gc; m, _ = f.load_model({path!r}); gc.collect();"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    path = resolve_model(args.model)
    original, tok = load_model(path)
    shared, _ = load_model(path)
    plan = headshare.make_plan(shared, ratio=args.ratio)
    headshare.share(shared, plan)
    layout = headshare.layout_of(original.config)

    p0, b0 = headshare.unique_parameters(original)
    p1, b1 = headshare.unique_parameters(shared)
    theory = plan.units_shared * layout.unit_params() * 4

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, original.config.vocab_size, (1, 512), generator=g)
    for m in (original, shared):  # warm-up
        _prefill(m, prompt[:, :64])
        _decode_steps(m, prompt[:, :16], 2)
    pre = {"original": [], "shared": []}
    dec = {"original": [], "shared": []}
    for _ in range(args.runs):
        for name, m in (("original", original), ("shared", shared)):
            pre[name].append(_prefill(m, prompt))
        for name, m in (("original", original), ("shared", shared)):
            dec[name].append(statistics.median(_decode_steps(m, prompt[:, :128], args.decode_steps)))

    with tempfile.TemporaryDirectory() as tmp:
        shared.save_pretrained(Path(tmp) / "s", tokenizer=tok)
        rss_orig, rss_shared = _rss_after_load(path), _rss_after_load(str(Path(tmp) / "s"))

    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in (("prefill", pre), ("decode", dec))}
    result = {
        "model": args.model, "ratio": args.ratio, "units_shared": plan.units_shared, "threads": torch.get_num_threads(),
        "runs": args.runs,
        "prefill_512_s": med["prefill"], "prefill_ratio": med["prefill"]["shared"] / med["prefill"]["original"],
        "decode_step_s": med["decode"], "decode_ratio": med["decode"]["shared"] / med["decode"]["original"],
        "weight_bytes_original": b0, "weight_bytes_shared": b1, "weight_bytes_saved": b0 - b1,
        "weight_bytes_saved_theory": theory, "saved_vs_theory": (b0 - b1) / theory,
        "rss_after_load_original": rss_orig, "rss_after_load_shared": rss_shared,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
