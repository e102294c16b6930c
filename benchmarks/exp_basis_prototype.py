"""Prototype (before `basisshare` existed): whitened low-rank q/k/v on a basis shared by a group of layers,
o refit, perplexity. Kept because BENCHMARKS.md quotes its rows; `sweep_basis.py` runs the real method.

Each SPEC is FRACTION:GROUP:RHO:VSCALE:PRUNE:ALLOC:WEIGHTED:SEQ
  FRACTION  share of all attention parameters removed in total (0.3)
  GROUP     consecutive layers per basis
  RHO       ridge of the o refit relative to the Gram's mean diagonal, or "none" for no o refit
  VSCALE    weight of the v rows in the stacked SVD (1: as they are)
  PRUNE     first prune this ratio of units with fitprune's plan (0: none); the bases take the rest
  ALLOC     "uniform" (one rank for every group) or "abs" (ranks by whitened singular value per parameter)
  WEIGHTED  "w": whiten with token-weighted Grams (1 / ||residual||^2), else "n"
  SEQ       ridge of a sequential refit of each layer's coefficients on its modified input (0: none)

    python benchmarks/exp_basis_prototype.py smollm2-135m 0.3:2:1.0:1:0.2:uniform:n:0
"""
import copy
import sys
import time

import torch

from headshare.arch import blocks, layout_of
from headshare.data import load_text
from headshare.evaluate import perplexity
from headshare.fetch import load_model
from headshare.methods import make_plan
from headshare.methods.calibration import calibration_ids, capture, run_block
from headshare.methods.fitshare import FitPruneConfig
from headshare.units import get_slices, set_slices, write_fitted

torch.manual_seed(0)
name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
model, tok = load_model(name)
model.eval()
text = load_text("builtin:eval", split="eval")
ids = calibration_ids(model, tok, "builtin:calib", 4096)
data = capture(model, ids)
bl = blocks(model)
L = len(bl)
att = [b.self_attn for b in bl]
X = []
for d in data:
    args, kw = d.attn_call
    x = kw.get("hidden_states", args[0] if args else None)
    X.append(x.reshape(-1, x.shape[-1]).double())
grams = [x.T @ x for x in X]
grams_w = [x.T @ (x * d.w) for x, d in zip(X, data, strict=False)]
layout_unit = None
D = X[0].shape[1]
attn_params = sum(sum(p.numel() for n, p in a.named_parameters() if "proj" in n) for a in att)
qkv = lambda a: [a.q_proj, a.k_proj, a.v_proj]  # noqa: E731
out_w = sum(p.weight.shape[0] for p in qkv(att[0]))
per_layer = attn_params // L
layout_unit = attn_params // (L * layout_of(model.config).units_per_layer)
print("attention params", attn_params, "per layer", per_layer, "qkv out", out_w, file=sys.stderr)


def whiten(g):
    g = g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.cholesky(g)  # g = S S^T



plans = {}
bases = {}
SEQ = False


@torch.no_grad()
def apply(m, frac, group, rho, vscale=1.0, prune=0.0, alloc="uniform", wg=False):
    am = [b.self_attn for b in blocks(m)]
    layout = layout_of(m.config)
    removed = 0
    bases.clear()
    if prune > 0:
        if prune not in plans:
            plans[prune] = make_plan(model, FitPruneConfig(ratio=prune), tokenizer=tok)
        plan = plans[prune]
        write_fitted(m, plan.fitted)
        for (lay, u) in plan.pruned:
            sl = get_slices(blocks(m)[lay], layout, u)
            set_slices(blocks(m)[lay], layout, u, {k: (torch.zeros_like(w), b) for k, (w, b) in sl.items()})
        removed += len(plan.pruned) * layout_unit
    target = frac * attn_params - removed
    groups = []
    for start in range(0, L, group):
        layers = list(range(start, min(L, start + group)))
        gr = [grams_w[i] if wg else grams[i] for i in layers]
        S = whiten(sum(gr))
        ws, where = [], []
        for i in layers:
            for j, p in enumerate(qkv(am[i])):
                rows = (p.weight.abs().sum(1) > 0).nonzero().flatten()
                ws.append(p.weight.double()[rows].T * (vscale if j == 2 else 1.0))
                where.append((p, rows, j))
        W = torch.cat(ws, 1)
        U, s, Vh = torch.linalg.svd(S.T @ W, full_matrices=False)
        groups.append((S, W, U, s, Vh, where))
    dense = sum(W.shape[0] * W.shape[1] for _, W, *_ in groups)
    keep_budget = dense - target
    ranks = []
    if alloc == "uniform":
        cost = sum(W.shape[0] + W.shape[1] for _, W, *_ in groups)
        ranks = [int(keep_budget // cost)] * len(groups)
    else:
        cand = []
        for gi, (_S, W, _U, s, _Vh, _where) in enumerate(groups):
            c = W.shape[0] + W.shape[1]
            tot = (s ** 2).sum()
            for sv in s.tolist():
                cand.append(((sv ** 2 / (tot if alloc == "rel" else 1.0)) / c, gi, c))
        cand.sort(reverse=True)
        ranks = [0] * len(groups)
        used = 0
        for _val, gi, c in cand:
            if used + c > keep_budget:
                continue
            ranks[gi] += 1
            used += c
    for (S, W, U, s, Vh, where), r in zip(groups, ranks, strict=False):
        r = min(r, len(s))
        B = torch.linalg.solve_triangular(S.T, U[:, :r], upper=True)
        R = B @ (s[:r, None] * Vh[:r])
        col = 0
        for p, rows, j in where:
            w = len(rows)
            bases.setdefault(p, (B, rows, p.weight.double()[rows].clone()))
            new = torch.zeros_like(p.weight)
            new[rows] = (R[:, col:col + w] / (vscale if j == 2 else 1.0)).T.float()
            p.weight.copy_(new)
            col += w
        removed += W.shape[0] * W.shape[1] - r * (W.shape[0] + W.shape[1])
    print("ranks", ranks, file=sys.stderr)
    # sequential o refit
    h = data[0].h
    mb = blocks(m)
    for layer in range(L):
        o = am[layer].o_proj

        def hook(_m, args, layer=layer, o=o):
            z = args[0].reshape(-1, args[0].shape[-1]).double()
            t = data[layer].a.double()
            w = data[layer].w if rho_w else torch.ones_like(data[layer].w)
            W0 = o.weight.double()
            v = t - z @ W0.T
            G = z.T @ (z * w)
            G = G + rho * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
            Dd = torch.linalg.solve(G, z.T @ (v * w))
            o.weight.copy_((W0 + Dd.T).float())
        hd = o.register_forward_pre_hook(hook) if rho is not None else None

        def ahook(_m, args, kwargs, layer=layer):
            x = kwargs.get("hidden_states", args[0] if args else None)
            x = x.reshape(-1, x.shape[-1]).double()
            for p in qkv(am[layer]):
                B, rows, W0 = bases[p]
                A = x @ B
                T = X[layer] @ W0.T
                G = A.T @ A
                G = G + SEQ * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
                C = torch.linalg.solve(G, A.T @ T)
                new = torch.zeros_like(p.weight)
                new[rows] = (B @ C).T.float()
                p.weight.copy_(new)
        ha = am[layer].register_forward_pre_hook(ahook, with_kwargs=True) if SEQ else None
        h = run_block(mb[layer], data[layer].block_call, h)
        if hd:
            hd.remove()
        if ha:
            ha.remove()
    return removed


rho_w = True
base = perplexity(model, tok, text, max_tokens=8192, progress=False)["perplexity"]
print(f"original {base:.3f}", flush=True)
for spec in sys.argv[2:]:
    frac, group, rho, vs, pr, alloc, wg, seq = spec.split(":")
    SEQ = float(seq)
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    rem = apply(m, float(frac), int(group), None if rho == "none" else float(rho), float(vs), float(pr), alloc, wg == "w")
    t1 = time.perf_counter() - t0
    p = perplexity(m, tok, text, max_tokens=8192, progress=False)["perplexity"]
    print(f"{spec}: ppl {p:.3f} removed {rem} ({rem / attn_params:.3f} attn) fit {t1:.1f}s", flush=True)
    del m
