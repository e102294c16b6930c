"""`basisshare` settings on one model: perplexity of each option set on the eval half of `builtin`.

Every SPEC is comma-separated KEY=VALUE options of `BasisShareConfig` ("none" for None). The held-out
pruning costs do not depend on the options and are computed once for all specs.

    python benchmarks/sweep_basis.py smollm2-135m 8192 ratio=0.3,prune=0.6667,group=2 ratio=0.3,group=4
"""
import copy
import sys
import time

import headshare
from headshare.data import load_text
from headshare.evaluate import perplexity
from headshare.fetch import load_model
from headshare.methods import BasisShareConfig
from headshare.methods import basis as B
from headshare.sharing import unique_parameters

name = sys.argv[1]
tokens = int(sys.argv[2])
model, tok = load_model(name)
model.eval()
text = load_text("builtin:eval", split="eval")
cache = {}
orig = B.pruning_costs
def cached(model, d, layout, layer, *a, **k):  # per layer: the same for every spec
    if layer not in cache:
        cache[layer] = orig(model, d, layout, layer, *a, **k)
    return cache[layer]
B.pruning_costs = cached
print("original", perplexity(model, tok, text, max_tokens=tokens, progress=False)["perplexity"], flush=True)
for spec in sys.argv[3:]:
    kw = {}
    for part in spec.split(","):
        k, v = part.split("=")
        kw[k] = None if v == "none" else (int(v) if k == "group" else float(v))
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    plan = headshare.make_plan(m, BasisShareConfig(**kw), tokenizer=tok)
    t = time.perf_counter() - t0
    p0 = unique_parameters(m)[0]
    headshare.share(m, plan)
    rem = p0 - unique_parameters(m)[0]
    p = perplexity(m, tok, text, max_tokens=tokens, progress=False)["perplexity"]
    print(f"{spec}: ppl {p:.3f} removed {rem:,} rank {plan.notes['rank']} pruned {len(plan.pruned)} plan {t:.0f}s", flush=True)
    del m
