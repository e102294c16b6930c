"""Experiment (issue 11, item 3): does a mixing matrix on a borrowed unit still pay once it is fitted jointly
with the o refit, and counted in parameters?

`exp_mixing.py` measured the mixing on one unit's own output, with nothing else refitted. Here the target is the
layer's whole attention output, and the o columns of the units that stay are refitted together with whatever
replaces the removed unit (ridge towards their original values, rho as fitprune's, on the change):
- prune: nothing replaces it (fitprune's cost);
- scalar: the best earlier unit's output, borrowed with one fitted scale (fitshare's);
- R: the borrowed heads' outputs through a fitted width x width matrix, then the source's own o columns
  (z R O^T: the V/O symmetry lets R stand in for a mixing of the value rows); costs width^2 parameters;
- free o: the borrowed heads with o columns of their own (only the input side is shared); costs hidden x width.
Fitted on the first half of 4,096 calibration tokens, error measured on the second half (token weights as in
`headshare/methods/calibration.py`), for every unit of every third layer, sources the 6 layers before it (the best
source per unit and kind). The cost of removing a unit is its held-out error; the "price" of a kind is the error
it saves against pruning per parameter it spends against pruning.

    python benchmarks/exp_mixing_refit.py [--model smollm2-135m] [--unit kv|query] [--layers 1,4]
"""

from __future__ import annotations

import argparse

import torch

from headshare.arch import blocks, layout_of, unit_kind
from headshare.fetch import load_model
from headshare.methods.calibration import borrowed_z, calibration_ids, candidate_sources, capture, source_key
from headshare.methods.fitshare import RHO
from headshare.units import o_columns, unit_z


def ridge_to(f: torch.Tensor, y: torch.Tensor, w: torch.Tensor, prior: torch.Tensor, rho: float) -> torch.Tensor:
    """argmin_B ||y - f B||_w^2 + lam ||B - prior||^2, lam = rho x the mean diagonal of f'Wf."""
    g = f.T @ (f * w)
    lam = rho * g.diagonal().mean().clamp_min(1e-30)
    rhs = f.T @ (y * w) + lam * prior
    return torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), rhs)


def err(y: torch.Tensor, pred: torch.Tensor, w: torch.Tensor) -> float:
    return float((((y - pred) ** 2) * w).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--unit", default="kv")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", default=None, help="comma list of layers (default: every third from layer 1)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with unit_kind(args.unit):
        model, tok = load_model(args.model)
        model.eval()
        layout = layout_of(model.config)
        bl, U, D = blocks(model), layout.units_per_layer, layout.hidden_size
        width = layout.o_projection().unit_width
        unit_params = layout.unit_params()
        ids = calibration_ids(model, tok, "builtin:calib", args.tokens)
        data = capture(model, ids)
        n = ids.numel()
        fit, test = slice(0, n // 2), slice(n // 2, n)
        kinds = ("prune", "scalar", "R", "free o")
        spend = {"prune": 0, "scalar": 0, "R": width * width, "free o": D * width}
        sums = dict.fromkeys(kinds, 0.0)
        units = 0
        layers = [int(x) for x in args.layers.split(",")] if args.layers else range(1, layout.num_layers, 3)
        for layer in layers:
            d = data[layer]
            w = d.w
            wo = torch.cat([o_columns(bl[layer], layout, u) for u in range(U)], 1)  # (D, in)
            z_all = torch.cat([unit_z(d.z, layout, u) for u in range(U)], 1)
            a = z_all @ wo.T  # the attention output without bias: what the refit must match
            sources = candidate_sources(layer, U, 6, ())
            zb = borrowed_z(model, data[layer], layer, list(dict.fromkeys(source_key(layout, s, u) for s in sources
                                                                    for u in range(U))))
            for unit in range(U):
                keep = [u for u in range(U) if u != unit]
                zk = torch.cat([unit_z(d.z, layout, u) for u in keep], 1)
                m0 = torch.cat([o_columns(bl[layer], layout, u) for u in keep], 1).T  # (kept in, D)
                m = ridge_to(zk[fit], a[fit], w[fit], m0, RHO)
                best = {"prune": err(a[test], zk[test] @ m, w[test])}
                for k in ("scalar", "R", "free o"):
                    best[k] = best["prune"]  # a kind never does worse than pruning: it can leave the unit out
                for s in sources:
                    zs = zb[source_key(layout, s, unit)].double()
                    os_ = o_columns(bl[s[0]], layout, s[1])  # (D, width)
                    p = zs @ os_.T  # the borrowed output through the source's o columns
                    x_fit, m_fit = _scalar_joint(zk[fit], p[fit], a[fit], w[fit], m0)
                    best["scalar"] = min(best["scalar"], err(a[test], zk[test] @ m_fit + x_fit * p[test], w[test]))
                    # R: the part of a in the span of the source's o columns takes [zk, zs]; the rest zk alone
                    proj = os_ @ torch.linalg.solve(os_.T @ os_, os_.T)  # (D, D), onto span(O)
                    feats = torch.cat([zk, zs], 1)
                    prior = torch.cat([m0 @ proj, torch.zeros(width, D, dtype=m0.dtype)])
                    bp = ridge_to(feats[fit], a[fit] @ proj, w[fit], prior, RHO)
                    bq = ridge_to(zk[fit], a[fit] - a[fit] @ proj, w[fit], m0 - m0 @ proj, RHO)
                    pred = feats[test] @ bp + zk[test] @ bq
                    best["R"] = min(best["R"], err(a[test], pred, w[test]))
                    prior = torch.cat([m0, torch.zeros(width, D, dtype=m0.dtype)])
                    bf = ridge_to(feats[fit], a[fit], w[fit], prior, RHO)
                    best["free o"] = min(best["free o"], err(a[test], feats[test] @ bf, w[test]))
                e_out = err(unit_z(d.z, layout, unit)[test] @ o_columns(bl[layer], layout, unit).T, 0, w[test])
                print(layer, unit, {k: round(v / e_out, 3) for k, v in best.items()}, flush=True)
                for k in kinds:
                    sums[k] += best[k] / e_out
                units += 1
        print(f"{args.model}, {args.unit} units: held-out error after the joint refit, mean over {units} units, "
              "as a share of the unit's own output energy:")
        for k in kinds:
            saved = (sums["prune"] - sums[k]) / units
            price = f"  error saved per 1 % of a unit spent: {saved / (100 * spend[k] / unit_params):.4f}" \
                if spend[k] else ""
            print(f"  {k:>7}: {sums[k] / units:.3f}  (spends {spend[k]:,} of {unit_params:,} parameters){price}")


def _scalar_joint(zk, p, a, w, m0):
    """argmin over (M, x) of ||a - zk M - x p||_w^2 + lam ||M - m0||^2 (lam as `ridge_to`): the refit is linear in
    x, so M(x) = M(0) - x C with C the refit of p, and x follows in closed form."""
    g = zk.T @ (zk * w)
    lam = RHO * g.diagonal().mean().clamp_min(1e-30)
    chol = torch.linalg.cholesky(g + lam * torch.eye(g.shape[0], dtype=g.dtype))
    m_a = torch.cholesky_solve(zk.T @ (a * w) + lam * m0, chol)
    c = torch.cholesky_solve(zk.T @ (p * w), chol)
    ra, rp = a - zk @ m_a, p - zk @ c
    # ridge part: lam ||m_a - x c - m0||^2 is quadratic in x too
    num = float((rp * ra * w).sum()) + lam * float((c * (m_a - m0)).sum())
    den = float((rp * rp * w).sum()) + lam * float((c * c).sum())
    x = num / den if den > 0 else 0.0
    return x, m_a - x * c


if __name__ == "__main__":
    main()
