"""Sharing methods against the honest baselines on SmolLM2-135M: the run behind BENCHMARKS.md.

A thin wrapper over `headshare bench` (headshare/bench/) with this repository's output paths:
benchmarks/results/quality.{json,md,png}. Extra arguments go to `headshare bench` unchanged.

    python benchmarks/bench_quality.py --max-tokens 8192            # the published run
    python benchmarks/bench_quality.py --max-tokens 8192 --resume   # carry on after a crash
    python benchmarks/bench_quality.py --methods all --json /tmp/all.json   # every registered method
"""

from __future__ import annotations

import sys
from pathlib import Path

from headshare.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

DEFAULTS = ["--model", "smollm2-135m", "--ratios", "0,0.1,0.2,0.3,0.5",
            "--methods", "directshare,random,layerwise,prune",
            "--json", str(RESULTS / "quality.json"), "--md", str(RESULTS / "quality.md"),
            "--plot", str(RESULTS / "quality.png")]


def merged(argv: list[str]) -> list[str]:
    """DEFAULTS with every option given in argv replaced by argv's value."""
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    out, i = [], 0
    while i < len(DEFAULTS):
        if DEFAULTS[i] in given:
            i += 2
            continue
        out += DEFAULTS[i:i + 2]
        i += 2
    return ["bench", *out, *argv]


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    sys.exit(main(merged(sys.argv[1:])))
