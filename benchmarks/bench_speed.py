"""Does a shared model run as fast as the original, and does it need less memory while it runs?

Compares the original with shared checkpoints: DirectShare at --ratio (made here; the checkpoint
`headshare share MODEL --ratio R --out DIR` writes) and any given as --shared LABEL=DIR (for instance one
made with `headshare share MODEL --method prune --ratio 0.3 --out DIR`). Every model is loaded the way a
user loads it, with `headshare.fetch.load_model`.

- Resident memory: each model in a fresh process (this script with --child), --mem-runs processes per
  model taken in turn: peak RSS (VmHWM in /proc/self/status; ru_maxrss agrees) after loading, after a
  --prompt-token prefill and after --decode-steps greedy tokens, with the resident anonymous and
  file-backed memory at each point (the weights of a safetensors checkpoint are file-backed pages).
- Tensor memory, what `torch.cuda.max_memory_allocated` counts on a GPU, measured here from the CPU
  profiler's allocation timeline: unique weight bytes plus the peak of the tensors allocated during the
  prefill, and during the decode (on top of the cache the prefill left).
- Speed: all models loaded in this process and run in turn, run by run (the order rotating), so that all
  see the same machine noise: the median prefill (--prompt tokens with a KV cache, logits of the last
  position only, as `generate` runs it) and the median decode step after it, and their ratios
  shared / original.

Targets: peak memory of a shared model <= the original's - 0.9 x its weight bytes saved, at
prefill and decode; speed ratios <= 1.05.

    python benchmarks/bench_speed.py --ratio 0.3 --runs 11 --shared prune=DIR --json out.json
    python benchmarks/bench_speed.py --llama7b-layers 2 --runs 5 --json out.json   # Llama-2-7B's shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import headshare
from headshare.fetch import load_model, resolve_model

STAGES = ("load", "prefill", "decode")


def _status() -> dict[str, int]:
    """Peak and current resident memory of this process, in bytes."""
    want = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    out = {line.split(":")[0]: int(line.split()[1]) * 1024
           for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(want)}
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return out


def _prompt(model, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)


def _prefill(model, ids):
    # the cache and the last position's logits only: what `generate` computes before its first token
    return model(ids, use_cache=True, logits_to_keep=1)


def _step(model, out):
    return model(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)


def child(path: str, prompt: int, steps: int) -> None:
    """Run in a fresh process: load, prefill, decode, printing the memory after each as one JSON line."""
    stages = {}
    model, _ = load_model(path)
    gc.collect()
    stages["load"] = _status()
    ids = _prompt(model, prompt)
    with torch.no_grad():  # as generate runs
        out = _prefill(model, ids)
        stages["prefill"] = _status()
        for _ in range(steps):
            out = _step(model, out)
        stages["decode"] = _status()
    print(json.dumps(stages))


def _fresh(path: str, prompt: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--prompt", str(prompt), "--decode-steps", str(steps),
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _timed(model, ids, steps: int) -> tuple[float, float]:
    """(prefill seconds, median decode step seconds) of one greedy generation."""
    with torch.no_grad():
        t = time.perf_counter()
        out = _prefill(model, ids)
        prefill = time.perf_counter() - t
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = _step(model, out)
            times.append(time.perf_counter() - t)
    return prefill, statistics.median(times)


def _allocated_peak(fn) -> tuple[int, int]:
    """(peak, final) bytes of tensors allocated while `fn` runs, from the profiler's memory timeline:
    what a GPU's caching allocator counts in max_memory_allocated, less its block rounding."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            live += size
        elif action.name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak, live


def tensor_memory(model, ids, steps: int) -> dict[str, int]:
    """Weight bytes + the peak of tensors allocated during the prefill, and during the decode after it."""
    _, weights = headshare.unique_parameters(model)
    state = {}
    with torch.no_grad():
        def prefill():
            state["out"] = _prefill(model, ids)

        def decode():
            for _ in range(steps):
                state["out"] = _step(model, state["out"])

        peak_prefill, left = _allocated_peak(prefill)
        peak_decode, _ = _allocated_peak(decode)
    return {"weights": weights, "prefill": weights + peak_prefill, "decode": weights + left + peak_decode}


def _llama7b(layers: int, out: Path) -> str:
    """A random Llama-2-7B-shaped model (hidden 4096, 32 heads of 128, MLP 11008) with `layers` layers and
    a small vocabulary, so that the layers, not the embeddings, make the time and the memory."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                   num_key_value_heads=32, num_hidden_layers=layers, vocab_size=1024,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


def _median_stages(runs: list[dict]) -> dict[str, dict[str, int]]:
    return {s: {k: int(statistics.median(r[s][k] for r in runs)) for k in runs[0][s]} for s in STAGES}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--llama7b-layers", type=int, default=0,
                    help="instead of --model, a random model of Llama-2-7B's shapes with this many layers")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--shared", action="append", default=[], metavar="LABEL=DIR",
                    help="a shared checkpoint of the same model to compare too (repeatable)")
    ap.add_argument("--runs", type=int, default=11, help="timed generations per model")
    ap.add_argument("--mem-runs", type=int, default=3, help="fresh processes per model for resident memory")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default torch's); on a machine busy with other jobs, 1 measures the "
                         "model rather than how often a second thread gets a core")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args.prompt, args.decode_steps)

    with tempfile.TemporaryDirectory() as tmp:
        path = _llama7b(args.llama7b_layers, Path(tmp) / "orig") if args.llama7b_layers else resolve_model(args.model)
        original, tok = load_model(path)
        plan = headshare.make_plan(original, ratio=args.ratio)  # DirectShare, the paper's method
        headshare.share(original, plan)
        original.save_pretrained(Path(tmp) / "directshare", tokenizer=tok)
        del original
        gc.collect()
        paths = {"original": str(path), "directshare": str(Path(tmp) / "directshare")}
        paths.update(dict(s.split("=", 1) for s in args.shared))

        mem = {name: [] for name in paths}
        for _ in range(args.mem_runs):  # in turn, so that all models see the same machine
            for name, p in paths.items():
                mem[name].append(_fresh(p, args.prompt, args.decode_steps))

        models = {name: load_model(p)[0] for name, p in paths.items()}
        ids = _prompt(models["original"], args.prompt)
        for m in models.values():  # warm-up
            _timed(m, ids[:, :64], 2)
        times = {name: [] for name in models}
        names = list(models)
        for r in range(args.runs):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(_timed(models[name], ids, args.decode_steps))
        tensors = {name: tensor_memory(m, ids, args.decode_steps) for name, m in models.items()}

    result = {
        "model": f"llama-2-7b shape, {args.llama7b_layers} layers, vocab 1024" if args.llama7b_layers else args.model,
        "ratio": args.ratio, "prompt": args.prompt, "decode_steps": args.decode_steps, "runs": args.runs,
        "mem_runs": args.mem_runs, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg(), "models": {},
    }
    base = None
    for name in paths:
        rss = _median_stages(mem[name])
        pre = statistics.median(t[0] for t in times[name])
        dec = statistics.median(t[1] for t in times[name])
        row = {"path": paths[name], "rss": rss, "rss_runs": mem[name], "tensor_memory": tensors[name],
               "prefill_s": pre, "decode_step_s": dec}
        if base is None:
            base = row
        else:
            saved = base["tensor_memory"]["weights"] - row["tensor_memory"]["weights"]
            row["weight_bytes_saved"] = saved
            row["prefill_ratio"], row["decode_ratio"] = pre / base["prefill_s"], dec / base["decode_step_s"]
            row["rss_saved"] = {s: base["rss"][s]["VmHWM"] - rss[s]["VmHWM"] for s in STAGES}
            row["tensor_saved"] = {s: base["tensor_memory"][s] - tensors[name][s] for s in ("prefill", "decode")}
            row["targets"] = {
                "rss": all(row["rss_saved"][s] >= 0.9 * saved for s in ("prefill", "decode")),
                "tensor": all(v >= 0.9 * saved for v in row["tensor_saved"].values()),
                "speed": row["prefill_ratio"] <= 1.05 and row["decode_ratio"] <= 1.05,
            }
        result["models"][name] = row
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def _print(result: dict) -> None:
    mb = 2**20
    print(f"{result['model']}: {result['threads']} threads, load average {result['load_average'][0]:.1f}")
    print(f"{'model':12s} {'saved MB':>8s} | peak RSS MB load/prefill/decode (anon, file at decode) | "
          f"tensor peak MB prefill/decode | prefill s  decode ms | ratios")
    for name, r in result["models"].items():
        rss, tm = r["rss"], r["tensor_memory"]
        peaks = "/".join(f"{rss[s]['VmHWM'] / mb:.0f}" for s in STAGES)
        saved = f"{r['weight_bytes_saved'] / mb:.1f}" if "weight_bytes_saved" in r else "-"
        ratios = f"{r['prefill_ratio']:.3f} {r['decode_ratio']:.3f} {r['targets']}" if "targets" in r else ""
        print(f"{name:12s} {saved:>8s} | {peaks} ({rss['decode']['RssAnon'] / mb:.0f}, "
              f"{rss['decode']['RssFile'] / mb:.0f}) | {tm['prefill'] / mb:.1f}/{tm['decode'] / mb:.1f} | "
              f"{r['prefill_s']:.3f} {1000 * r['decode_step_s']:.1f} | {ratios}")
        if "rss_saved" in r:
            print(f"{'':12s} saved vs original: peak RSS {', '.join(f'{s} {v / mb:.1f}' for s, v in r['rss_saved'].items())}"
                  f" MB; tensors {', '.join(f'{s} {v / mb:.1f}' for s, v in r['tensor_saved'].items())} MB")


if __name__ == "__main__":
    main()
