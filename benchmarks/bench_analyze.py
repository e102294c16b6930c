"""How fast is `headshare analyze` on a Llama-2-7B-shaped checkpoint, against the authors' pair-by-pair loop?

Writes a checkpoint with Llama-2-7B's attention shapes (32 layers x 32 heads x 128 x 4096, fp16
safetensors, random values: the shapes are what cost; the MLP weights are left out because
analysis never reads them), then:

1. runs the blocked, streamed similarity in a fresh subprocess and records its wall time and peak
   memory (ru_maxrss of that child);
2. times a pair-by-pair loop written the way the authors' code works (slice both heads out of the
   weights inside the inner loop, concatenate W_q and W_k, cosine) on a random subset of pairs and
   scales that time by the number of pairs of the full analysis.

    python benchmarks/bench_analyze.py --dir /tmp/llama7b-attn --pairs 300
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

L, H, D, HD = 32, 32, 4096, 128


def write_checkpoint(path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "config.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for layer in range(L):
        tensors = {f"model.layers.{layer}.self_attn.{p}_proj.weight":
                   (torch.randn(D, D, generator=g) * 0.02).half() for p in "qkvo"}
        save_file(tensors, path / f"model-{layer:05d}.safetensors")
    LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=H, num_hidden_layers=L,
                intermediate_size=11008, vocab_size=32000).save_pretrained(path)


def run_analysis(path: Path) -> dict:
    """The real thing, in a child process so that its peak memory is its own."""
    code = (
        "import time, json, sys; from headshare.similarity import analysis; t=time.perf_counter();"
        f"r=analysis({str(path)!r}, progress=False); "
        "print(json.dumps({'seconds': time.perf_counter()-t, 'pairs': len(r['best_matches'])}))"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = json.loads(out.strip().splitlines()[-1])
    res.update(wall_seconds=wall, peak_rss_gib=peak_kib / 2**20, earlier_children_peak_gib=before / 2**20)
    return res


def naive_loop(path: Path, pairs: int) -> dict:
    """The authors' way, on `pairs` random pairs: slice, concatenate and compare inside the loop."""
    from safetensors.torch import load_file

    q, k = [], []
    for layer in range(L):
        t = load_file(path / f"model-{layer:05d}.safetensors")
        q.append(t[f"model.layers.{layer}.self_attn.q_proj.weight"].float())
        k.append(t[f"model.layers.{layer}.self_attn.k_proj.weight"].float())
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, L * H, (pairs, 2), generator=g).tolist()
    t0 = time.perf_counter()
    for a, b in idx:
        la, ha, lb, hb = a // H, a % H, b // H, b % H
        va = torch.cat([q[la][ha * HD:(ha + 1) * HD], k[la][ha * HD:(ha + 1) * HD]]).flatten()
        vb = torch.cat([q[lb][hb * HD:(hb + 1) * HD], k[lb][hb * HD:(hb + 1) * HD]]).flatten()
        torch.nn.functional.cosine_similarity(va, vb, dim=0).item()
    per_pair = (time.perf_counter() - t0) / pairs
    n = L * H
    total_pairs = n * (n - 1) // 2  # every unordered pair, as the full similarity matrix needs
    return {"pairs_timed": pairs, "seconds_per_pair": per_pair, "total_pairs": total_pairs,
            "projected_seconds": per_pair * total_pairs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/llama7b-attn")
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = Path(args.dir)
    t = time.perf_counter()
    write_checkpoint(path)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f} s: {path}", file=sys.stderr)
    fast = run_analysis(path)
    slow = naive_loop(path, args.pairs)
    result = {"threads": torch.get_num_threads(), "analyze": fast, "pair_by_pair": slow,
              "speedup": slow["projected_seconds"] / fast["wall_seconds"]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
