"""Memory and speed of a saved checkpoint, measured in a fresh Python process.

A fresh process because a process's peak RSS only ever grows: measured in the benchmark's own process it
would report the largest model seen so far.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROBE_KEYS = ("rss_after_load_bytes", "peak_rss_bytes", "peak_excludes_load", "prefill_s", "decode_s",
              "prefill_tokens", "decode_tokens", "decode_prompt_tokens")


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS, so RSS counts live memory, not the loader's leftovers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.inference_mode()
def probe_checkpoint(path: str | Path, prefill_tokens: int = 512, decode_tokens: int = 32,
                     repeats: int = 3, prompt_tokens: int = 128, dtype: str = "float32") -> dict:
    """Load a checkpoint in this process (on the CPU, in `dtype`) and measure memory and speed (meant for a
    fresh process).

    prefill_s: median of `repeats` forwards of `prefill_tokens` tokens without cache. decode_s: median
    time of `decode_tokens` one-token steps with the KV cache, after a `prompt_tokens` prompt.
    """
    from ..fetch import load_model

    model, _ = load_model(str(path), dtype=getattr(torch, dtype))
    cfg = model.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    n = min(prefill_tokens, max_pos - decode_tokens - 1) if max_pos else prefill_tokens
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    _release_freed_memory()
    rss = _status_bytes("VmRSS")
    reset = _reset_peak()
    model(input_ids=ids[:, :16])  # warm-up: first calls pay for lazy initialisation
    prefill = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        prefill.append(time.perf_counter() - t0)
    out = model(input_ids=ids[:, :prompt_tokens], use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode_tokens):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        steps.append(time.perf_counter() - t0)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return {"rss_after_load_bytes": rss, "peak_rss_bytes": _status_bytes("VmHWM"), "peak_excludes_load": reset,
            "prefill_s": statistics.median(prefill), "decode_s": statistics.median(steps),
            "prefill_tokens": n, "decode_tokens": decode_tokens, "decode_prompt_tokens": min(prompt_tokens, n)}


def probe(path: str | Path, threads: int | None = None, timeout: float = 900, **kw) -> dict:
    """`probe_checkpoint` run in a fresh Python process with `threads` torch threads."""
    cmd = [sys.executable, "-m", "headshare.bench", "probe", str(path),
           "--threads", str(threads or torch.get_num_threads())]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"probe of {path} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
