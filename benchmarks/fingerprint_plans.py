"""Fingerprint what every method makes of a model: the SHA-1 of the shared model's whole state_dict, and the
plan's assignments (sources and scales) and pruned units, one JSON entry per (method, ratio).

For refactors that must not change behaviour: run it on the old code and on the new, and compare.

    git worktree add /tmp/old <old commit>
    PYTHONPATH=/tmp/old python benchmarks/fingerprint_plans.py /tmp/old.json     # the old code
    python benchmarks/fingerprint_plans.py /tmp/new.json                         # this checkout
    python benchmarks/fingerprint_plans.py --compare /tmp/old.json /tmp/new.json

Works with the old API (`headshare.make_plan(model, ratio=, method=, tokenizer=)`, which took and ignored
unknown keywords) and the new one (which takes the tokenizer only where a method reads text).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time

import torch

CALIBRATED = ("prune", "actshare", "fitprune", "fitshare", "basisshare", "choiceshare", "autoshare")


def state_hash(model) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model_name: str, methods: list[str], ratios: list[float], out: str, plans: str | None = None) -> dict:
    import headshare
    from headshare.fetch import load_model

    print(f"headshare from {headshare.__file__}", file=sys.stderr)
    model, tok = load_model(model_name)
    result = {}
    for ratio in ratios:
        for method in methods:
            t0 = time.perf_counter()
            copy_ = copy.deepcopy(model)
            name, _, unit = method.partition("@")  # METHOD@UNIT: a unit kind other than the default
            kw = {"tokenizer": tok} if name in CALIBRATED else {}
            if unit:
                kw["unit"] = unit
            plan = headshare.make_plan(copy_, ratio=ratio, method=name, **kw)
            if plans:
                plan.save(f"{plans}/{method}@{ratio}.json")
            headshare.share(copy_, plan)
            d = plan.to_dict()
            result[f"{method}@{ratio}"] = {"weights": state_hash(copy_), "assignments": d["assignments"],
                                           "pruned": d["pruned"]}
            print(f"{method}@{ratio} {result[f'{method}@{ratio}']['weights'][:12]} {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
            with open(out, "w") as f:  # after every entry: a long run keeps what it has
                json.dump(result, f, indent=1)
            del copy_
    return result


def compare(a_path: str, b_path: str) -> int:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    bad = 0
    for key in sorted(set(a) & set(b)):
        same = {f: a[key][f] == b[key][f] for f in ("weights", "assignments", "pruned")}
        bad += not all(same.values())
        print(f"{key:>18}  " + "  ".join(f"{f} {'same' if v else 'DIFFERENT'}" for f, v in same.items()))
    only = sorted(set(a) ^ set(b))
    if only:
        print(f"in one file only: {', '.join(only)}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="JSON file to write")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="directshare,random,layerwise,prune,alignshare,actshare,fitprune,fitshare")
    ap.add_argument("--ratios", default="0.3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plans", default=None, help="also save every plan into this directory")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two files instead")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("give the output JSON file (or --compare A B)")
    torch.set_num_threads(args.threads)
    fingerprint(args.model, args.methods.split(","), [float(r) for r in args.ratios.split(",")], args.out,
                args.plans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
