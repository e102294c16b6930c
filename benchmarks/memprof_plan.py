"""Where a plan's memory peaks: make one plan on a model while a thread samples the process's RSS every
0.25 s together with the main thread's stack, then print the largest samples and where they were taken.

    python benchmarks/memprof_plan.py 65536                       # fitprune at 0.3 on 65,536 pydoc tokens
    python benchmarks/memprof_plan.py 4096 --method basisshare --calib builtin:calib

Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback

import torch

import headshare
from headshare.fetch import load_model
from headshare.methods import make_config


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tokens", type=int, help="calibration tokens")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="fitprune")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--calib", default="pydoc")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=6, help="samples to print")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    main_id = threading.main_thread().ident
    samples: list[tuple[float, list[str]]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            frame = sys._current_frames().get(main_id)
            stack = [f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}" for f in traceback.extract_stack(frame)]
            samples.append((rss_gb(), stack[-6:]))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    cfg = make_config(args.method, args.ratio, calib=args.calib, calib_tokens=args.tokens)
    plan = headshare.make_plan(model, cfg, tokenizer=tok)
    done.set()
    sampler.join()
    print(f"{args.method} at {args.ratio} on {args.tokens} tokens of {args.calib}: {time.time() - t0:.0f} s, "
          f"{len(plan.pruned)} units pruned")
    for gb, stack in sorted(samples, key=lambda s: -s[0])[:args.top]:
        print(f"{gb:.2f} GB  " + " > ".join(stack))


if __name__ == "__main__":
    main()
