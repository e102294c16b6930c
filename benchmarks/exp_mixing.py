"""Experiment: how much of a removed unit's output can a borrowed unit give back, held out?

For every third layer and each of its units, over the sources in the 6 layers before it: the share of the
unit's output error (tokens weighted as in `headshare/methods/calibration.py`) left on the second half of 4,096
calibration tokens after fitting on the first half, for
- scalar: one scale on the borrowed output (what actshare and fitshare do);
- R: a mixing matrix on the borrowed heads' outputs before the shared o columns (the V/O symmetry:
  z R O^T; width x width extra parameters per unit);
- R per head: the same, block-diagonal per query head;
- free o: any o matrix for the borrowed heads (an upper bound that shares nothing of o).
The best source per unit; 1.0 = no better than pruning it. Recorded in BENCHMARKS.md ("Beyond the paper").

    python benchmarks/exp_mixing.py
"""

from __future__ import annotations

import torch

from headshare.arch import blocks, layout_of
from headshare.fetch import load_model
from headshare.methods.calibration import borrowed_z, calibration_ids, candidate_sources, capture
from headshare.units import o_columns, unit_z


def ridge(z, y, w, lam=1e-2):
    g = z.T @ (z * w)
    g = g + lam * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g, z.T @ (y * w))


def error(y, pred, w) -> float:
    return float((((y - pred) ** 2) * w).sum())


def main() -> None:
    model, tok = load_model("smollm2-135m")
    model.eval()
    layout = layout_of(model.config)
    bl, head = blocks(model), layout.head_dim
    ids = calibration_ids(model, tok, "builtin:calib", 4096)
    data = capture(model, ids)
    n = ids.numel()
    fit, test = slice(0, n // 2), slice(n // 2, n)
    kinds = ("scalar", "R", "R per head", "free o")
    total = {k: [] for k in kinds}
    for layer in range(1, layout.num_layers, 3):
        w = data[layer].w
        sources = candidate_sources(layer, layout.units_per_layer, 6, ())
        zb = borrowed_z(model, data[layer], layer, sources)
        for unit in range(layout.units_per_layer):
            y = unit_z(data[layer].z, layout, unit) @ o_columns(bl[layer], layout, unit).T
            e0 = error(y[test], 0 * y[test], w[test])
            best = dict.fromkeys(kinds, 1.0)
            for s in sources:
                z, o = zb[s], o_columns(bl[s[0]], layout, s[1])  # (N, width), (D, width)
                p = z @ o.T
                a = float((p[fit] * y[fit] * w[fit]).sum() / (p[fit] ** 2 * w[fit]).sum())
                best["scalar"] = min(best["scalar"], error(y[test], a * p[test], w[test]) / e0)
                target = y @ o @ torch.linalg.inv(o.T @ o)  # y ~ z R o^T  <=>  z R ~ y o (o^T o)^-1
                r = ridge(z[fit], target[fit], w[fit])
                best["R"] = min(best["R"], error(y[test], z[test] @ r @ o.T, w[test]) / e0)
                rb = torch.zeros_like(r)
                for h in range(0, z.shape[1], head):
                    rb[h:h + head, h:h + head] = ridge(z[fit][:, h:h + head], target[fit][:, h:h + head], w[fit])
                best["R per head"] = min(best["R per head"], error(y[test], z[test] @ rb @ o.T, w[test]) / e0)
                m = ridge(z[fit], y[fit], w[fit])
                best["free o"] = min(best["free o"], error(y[test], z[test] @ m, w[test]) / e0)
            print(layer, unit, {k: round(v, 3) for k, v in best.items()}, flush=True)
            for k in kinds:
                total[k].append(best[k])
    print("mean over units:", {k: round(sum(v) / len(v), 3) for k, v in total.items()})


if __name__ == "__main__":
    main()
