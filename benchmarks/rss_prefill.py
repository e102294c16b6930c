"""Peak resident memory of one model through a prefill and a few decoding steps, in this fresh process.

    python benchmarks/rss_prefill.py MODEL_OR_DIR [--prompt 512] [--steps 16]

Prints VmHWM (peak RSS), RssAnon and RssFile in MB after loading (`headshare.fetch.load_model`), after the
prefill and after the decoding steps. Run it once per model and repeat: each run is its own process, so one
model's allocations do not sit in the other's heap. `bench_speed.py` does this and more (speed, the CPU
profiler's tensor peak); this is the short version for quick comparisons.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from headshare.fetch import load_model


def status() -> dict[str, int]:
    want = ("VmHWM", "RssAnon", "RssFile")
    return {line.split(":")[0]: int(line.split()[1]) // 1024
            for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(want)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    gc.collect()
    print("load", status())
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        print("prefill", status())
        for _ in range(args.steps):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        print("decode", status())


if __name__ == "__main__":
    main()
