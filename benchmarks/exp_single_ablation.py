"""Experiment: prune the units whose removal alone changes the output least (KL on calibration text).

Ablates every unit by itself on the first N calibration tokens (KL(original || ablated) of the next-token
distributions, nats per token), prunes the lowest-KL units at each ratio and evaluates on the first 8,192
tokens of the eval half. Recorded in BENCHMARKS.md ("Beyond the paper") as an importance score that did
not beat `prune`'s relative output energy below 50 %.

    python benchmarks/exp_single_ablation.py --calib-tokens 1024
"""

from __future__ import annotations

import argparse
import time

import torch

import headshare
from headshare.arch import blocks, layout_of
from headshare.data import load_text
from headshare.evaluate import perplexity
from headshare.fetch import load_model
from headshare.methods.calibration import calibration_ids
from headshare.plan import new_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    model.eval()
    layout = layout_of(model.config)
    width = layout.head_dim * layout.q_heads_per_unit
    ids = calibration_ids(model, tok, "builtin:calib", args.calib_tokens)
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits.float(), -1)
    silenced: dict[int, int] = {}  # layer -> unit whose o input is zeroed (= pruned)

    def hook(layer):
        def pre(_m, inputs):
            if layer in silenced:
                x = inputs[0].clone()
                u = silenced[layer]
                x[..., u * width:(u + 1) * width] = 0
                return (x,)
        return pre

    for i, block in enumerate(blocks(model)):
        block.self_attn.o_proj.register_forward_pre_hook(hook(i))
    t0 = time.time()
    cost = {}
    for layer in range(layout.num_layers):
        for unit in range(layout.units_per_layer):
            silenced.clear()
            silenced[layer] = unit
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits.float(), -1)
            cost[(layer, unit)] = float((base.exp() * (base - lp)).sum(-1).mean())
    silenced.clear()
    print(f"{len(cost)} single ablations in {time.time() - t0:.0f} s", flush=True)
    text = load_text("builtin", split="eval")
    for ratio in (float(r) for r in args.ratios.split(",")):
        n = int(ratio * layout.units_total)
        pruned = sorted(sorted(cost, key=cost.get)[:n])
        fresh, _ = load_model("smollm2-135m")
        headshare.share(fresh, new_plan(fresh, "single-ablation", ratio, pruned=pruned))
        ppl = perplexity(fresh, tok, text, window=512, stride=512, max_tokens=8192, progress=False)["perplexity"]
        print(f"ratio {ratio}: {n} units pruned, perplexity {ppl:.3f}", flush=True)


if __name__ == "__main__":
    main()
