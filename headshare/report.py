"""`headshare report`: the paper's similarity analysis ("Why heads") for any model, as a page to look at.

The report answers, for one model, whether the paper's premise holds before anything is shared:

1. Layer-wise attention-map similarity: are whole layers' attention maps alike? (The paper: rarely.)
2. Head-wise attention-map similarity: for one chosen head, its most similar heads anywhere in the
   network. (The paper: often alike, and spread over many layers.)
3. Weight similarity per match function (q, k, v, qk, qkv) against attention-map similarity over all
   pairs of heads in different layers: a scatter plot and the Spearman rank correlation. (The paper:
   weights predict maps, so heads can be matched without data.)
4. The sharing plan at the given ratio and method on the layers x units grid, and the parameters saved.

Definitions (our choices; the paper leaves them open):
- Heads are *query heads*, the paper's L x H attention maps; head index = layer * H + h. With grouped-
  query attention a unit (what `headshare.share` moves) is one key/value head with its H/K query heads,
  so units are coarser than heads: the head-wise panels show query heads with thin lines between units,
  the plan panel shows units. Weight vectors are built per query head: its own W_q rows, and the W_k /
  W_v rows of the key/value head it reads, so two query heads of one unit have k and v cosine 1.
  With multi-query attention the single key/value head belongs to no unit and k, v (and the k, v parts
  of qk, qkv) are left out, as in `headshare.similarity`.
- Attention-map similarity of two maps A, B (T x T, causal, rows sum to 1) on one window is the mean over
  query positions t of cos(A[t], B[t]); it is averaged over the calibration windows. Row-wise cosine
  keeps the first, trivially identical rows (position 0 attends only to itself) from dominating as
  they would in one cosine of the flattened maps.
- A layer's map is its H head maps in head order, so layer similarity is the mean over h of the
  similarity of head (l, h) with head (l', h): exactly the pairing that sharing a whole layer (ALBERT-
  style) imposes, and the cosine of the flattened (H, T, T) tensors of row-normalised maps. The report
  also gives a second, gentler definition, the similarity of the layers' mean maps (the mean over
  heads, itself row-stochastic); averaging smooths maps, so it rates layers as more alike.
- "Best match" of a head or layer is the most similar one in any *other* layer, so layers and heads are
  compared on the same footing.

Memory stays bounded: each window's maps are row-normalised, their causal lower triangles gathered into
one (heads, T(T+1)/2) matrix and multiplied into a running (heads x heads) Gram; no map outlives its
window. Peak extra memory is about 2.5 x L x H x T^2 floats, those of one window.

>>> from headshare.report import report
>>> result = report(model, tokenizer, "report/", ratio=0.3)   # doctest: +SKIP
>>> result.data["weight_vs_attention"]["qk"]["spearman"]      # doctest: +SKIP
>>> write(json.load(open("report/report.json")), "report2/")  # redraw from the numbers  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .arch import arch_spec, blocks, layout_of
from .errors import HeadshareError
from .files import atomic_dir
from .similarity import METRICS, metric_parts
from .units import unit_slices

MAX_SCATTER_POINTS = 20000  # per match function; the correlation always uses every pair


# -- numbers -----------------------------------------------------------------------------------------------

def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, tied values sharing the mean of their ranks (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # a run of equal values [start, end) gets the rank (start + 1 + end) / 2
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    run_ranks = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the average-tie ranks. NaN if either is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / denom) if denom > 0 else float("nan")


def head_weight_vectors(model, metric: str = "qk") -> torch.Tensor:
    """(L * H, dim) float32 weight vectors, one per query head, not normalised.

    A query head's vector is its W_q rows and/or the W_k / W_v rows of the key/value head it reads,
    flattened and concatenated in the order of `METRICS[metric]`.
    """
    layout = layout_of(model.config)
    parts = metric_parts(metric, layout)
    U, gq, d = layout.units_per_layer, layout.q_heads_per_unit, layout.head_dim
    H = layout.num_heads
    rows = []
    for block in blocks(model):
        pieces: dict[str, torch.Tensor] = {}
        for proj in layout.projections():
            if proj.role != "out":
                continue
            w = block.get_submodule(proj.path).weight.detach()
            for name, t in unit_slices(w, proj, U).items():
                if name == "q":  # (U, gq*d, D) -> (H, d, D): unit u holds query heads u*gq .. u*gq+gq-1
                    pieces[name] = t.reshape(U * gq, d, t.shape[-1])
                else:  # (U, d, D), one per key/value head -> repeated for each query head reading it
                    pieces[name] = t.repeat_interleave(gq, dim=0)
        rows.append(torch.cat([pieces[p].reshape(H, -1).float() for p in parts], dim=1))
    return torch.cat(rows)


def cosine_matrix(v: torch.Tensor) -> torch.Tensor:
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return v @ v.T


def _row_normalised(maps: torch.Tensor, keep: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(n, T, T) maps -> (n, entries): rows scaled to unit length, then only the `keep` entries (the
    causal lower triangle: the rest is zero) or all of them."""
    maps = maps / maps.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return maps[:, keep[0], keep[1]] if keep is not None else maps.flatten(1)


@torch.no_grad()
def attention_similarity(model, windows: torch.Tensor, progress: bool = True,
                         device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-map similarity of all query-head pairs and of all layer pairs over token windows.

    The maps come from the calibration pipeline (`calibration.walk`, one block at a time on `device`, one
    window per block call) with eager attention; each layer's row-normalised maps wait on the CPU for the
    Gram blocks against the later layers.

    Args:
        windows: (n, T) token ids.
    Returns:
        (heads (L*H, L*H), layer mean maps (L, L)) float64 matrices of the mean row cosine, averaged
        over windows.
    """
    from .methods.calibration import walk

    layout = layout_of(model.config)
    L, H = layout.num_layers, layout.num_heads
    n, T = windows.shape
    if n == 0:
        raise HeadshareError("no calibration windows: the text is shorter than one window")
    apath = arch_spec(layout.model_type).attention
    gram_heads = torch.zeros(L * H, L * H, dtype=torch.float64)
    gram_layers = torch.zeros(L, L, dtype=torch.float64)
    heads: list[torch.Tensor] = []  # per layer: (n, H, entries) row-normalised maps
    means: list[torch.Tensor] = []  # per layer: (n, entries) of the head-mean map
    keep = None
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # sdpa/flash kernels never materialise the maps
    try:
        for layer, d in walk(model, windows, device, progress, desc="attention maps", batch_tokens=T):
            maps: list[torch.Tensor] = []
            attn = blocks(model)[layer].get_submodule(apath)
            handle = attn.register_forward_hook(lambda _m, _a, out, maps=maps: maps.append(out[1][0].float()))
            try:
                for args, kwargs in d.attn_calls:  # one window each
                    attn(*args, **kwargs)
            finally:
                handle.remove()
            if keep is None:
                tril = torch.tril_indices(T, T, device=maps[0].device)
                causal = not maps[0].triu(1).any()  # encoders (BERT) attend both ways
                keep = (tril[0], tril[1]) if causal else None
            heads.append(torch.stack([_row_normalised(m, keep) for m in maps]).cpu())
            means.append(torch.stack([_row_normalised(m.mean(0, keepdim=True), keep)[0] for m in maps]).cpu())
            rows = slice(layer * H, (layer + 1) * H)
            for other in range(layer + 1):
                cols = slice(other * H, (other + 1) * H)
                block = sum((heads[layer][w] @ heads[other][w].T).double() for w in range(n))
                gram_heads[rows, cols] = block
                gram_heads[cols, rows] = block.T
                s = sum(float(means[layer][w] @ means[other][w]) for w in range(n))
                gram_layers[layer, other] = gram_layers[other, layer] = s
    finally:
        model.set_attn_implementation(before)
    # each map contributes sum_t cos(A[t], B[t]); / T gives the mean row cosine, / n the window mean
    return gram_heads / (T * n), gram_layers / (T * n)


def _other_layer_mask(L: int, H: int) -> np.ndarray:
    layer = np.repeat(np.arange(L), H)
    return layer[:, None] != layer[None, :]


def _round(a, nd: int = 5):
    return np.round(np.asarray(a, dtype=np.float64), nd).tolist()


# -- the report's data ----------------------------------------------------------------------------------

def compute(model, tokenizer, *, text: str = "builtin:calib", windows: int = 8, window: int = 256,
            head: tuple[int, int] | None = None, top: int | None = None, ratio: float = 0.3,
            method: str = "directshare", plan_kwargs: dict | None = None, seed: int = 0,
            max_points: int = MAX_SCATTER_POINTS, name: str | None = None,
            progress: bool = True) -> tuple[dict, np.ndarray]:
    """Everything the report shows, as a JSON-ready dict, plus the (L*H, L*H) head map-similarity matrix.

    Args:
        text: calibration text source (see `headshare.data.load_text`), split "calib".
        head: (layer, query head) of the head-wise panel; default head 0 of the last layer.
        top: how many most similar heads to mark; default H, the paper's "top-H".
        plan_kwargs: options of the plan method's config (calib, metric, seed, ...); unknown ones are refused.
        name: what to call the model in the report (default: its config's name_or_path).
    """
    from .data import load_text, token_blocks
    from .methods import get_method, make_plan
    from .sharing import share, unique_parameters

    timings = {}
    layout = layout_of(model.config)
    L, H, U = layout.num_layers, layout.num_heads, layout.units_per_layer
    head = (L - 1, 0) if head is None else tuple(head)
    if not (0 <= head[0] < L and 0 <= head[1] < H):
        raise HeadshareError(f"--head {head[0]},{head[1]} is outside this model's {L} layers x {H} heads")
    top = H if top is None else top
    if not 1 <= top < L * H:
        raise HeadshareError(f"top must be in [1, {L * H - 1}], got {top}")

    t0 = time.time()
    ids = token_blocks(tokenizer, load_text(text, split="calib"), window, max_blocks=windows)
    S, S_mean_maps = (m.numpy() for m in attention_similarity(model, ids, progress=progress))
    # layer l against layer l': head h against head h, averaged over h
    S_layers = np.einsum("ahbh->ab", S.reshape(L, H, L, H)) / H
    timings["attention_s"] = round(time.time() - t0, 2)
    other = _other_layer_mask(L, H)

    # 1. layers
    off_diag = ~np.eye(L, dtype=bool)
    layer_best = np.where(off_diag, S_layers, -np.inf).argmax(1)
    mean_map_best = np.where(off_diag, S_mean_maps, -np.inf).max(1)
    layers = {
        "matrix": _round(S_layers),
        "best": [{"layer": i, "match": int(j), "similarity": round(float(S_layers[i, j]), 5)}
                 for i, j in enumerate(layer_best)],
    }
    layers["mean_map_matrix"] = _round(S_mean_maps)
    layer_best_sim = S_layers[np.arange(L), layer_best]

    # per-head best match in another layer, and the layers its top matches come from
    Sh = np.where(other, S, -np.inf)
    head_best = Sh.argmax(1)
    head_best_sim = Sh[np.arange(L * H), head_best]
    top_idx = np.argsort(-Sh, axis=1, kind="stable")[:, :top]
    distinct_layers = np.array([len(set((row // H).tolist())) for row in top_idx])
    heads = {
        "best": [{"layer": i // H, "head": i % H, "match_layer": int(j) // H, "match_head": int(j) % H,
                  "similarity": round(float(S[i, j]), 5)} for i, j in enumerate(head_best)],
        "top": top,
        "mean_distinct_layers_in_top": round(float(distinct_layers.mean()), 3),
    }
    summary = {
        "layer_best_mean": round(float(layer_best_sim.mean()), 4),
        "layer_best_median": round(float(np.median(layer_best_sim)), 4),
        "head_best_mean": round(float(head_best_sim.mean()), 4),
        "head_best_median": round(float(np.median(head_best_sim)), 4),
        "head_pair_mean": round(float(S[other].mean()), 4),
        "layer_pair_mean": round(float(S_layers[off_diag].mean()), 4),
        "layer_mean_map_best_mean": round(float(mean_map_best.mean()), 4),
        "layer_mean_map_best_median": round(float(np.median(mean_map_best)), 4),
        "mean_distinct_layers_in_top": heads["mean_distinct_layers_in_top"],
    }

    # 2. the chosen head: its similarity to every head, and its top matches in other layers
    c = head[0] * H + head[1]
    focus = {
        "head": list(head),
        "top": top,
        "grid": _round(S[c].reshape(L, H)),
        "matches": [{"layer": int(j) // H, "head": int(j) % H, "similarity": round(float(S[c, j]), 5)}
                    for j in top_idx[c]],
        "distinct_layers": int(distinct_layers[c]),
    }

    # 3. weights vs maps over all pairs of heads in different layers (the pairs sharing chooses from)
    t0 = time.time()
    iu, ju = np.triu_indices(L * H, k=1)
    keep = other[iu, ju]
    iu, ju = iu[keep], ju[keep]
    rng = np.random.default_rng(seed)
    drawn = np.sort(rng.choice(len(iu), size=min(max_points, len(iu)), replace=False))
    y_all = S[iu, ju]
    layer_of = np.repeat(np.arange(L), H)
    earlier = layer_of[None, :] < layer_of[:, None]  # [i, j]: head j sits in an earlier layer than head i
    S_earlier = np.where(earlier, S, -np.inf)
    has_earlier = np.arange(L * H) >= H
    oracle = S_earlier[has_earlier].max(1)
    wva: dict = {}
    for metric in METRICS:
        try:
            W = cosine_matrix(head_weight_vectors(model, metric)).double().cpu().numpy()  # a GPU model's too
        except ValueError as e:  # multi-query attention has no per-unit k/v
            wva[metric] = {"skipped": str(e)}
            continue
        x_all = W[iu, ju]
        pick = np.where(earlier, W, -np.inf)[has_earlier].argmax(1)
        wva[metric] = {
            "spearman": round(spearman(x_all, y_all), 4),
            # q and k of a head can both flip sign without changing its map, so |cosine| is reported too
            "spearman_abs": round(spearman(np.abs(x_all), y_all), 4),
            "pairs": int(len(iu)),
            # how good, in attention-map terms, the earlier-layer partner chosen by weights is
            "map_similarity_of_weight_best_earlier": round(float(S[has_earlier][np.arange(len(pick)), pick].mean()), 4),
            "x": _round(x_all[drawn], 4),
        }
    scatter = {"pairs_total": int(len(iu)), "pairs_drawn": int(len(drawn)),
               "i": iu[drawn].tolist(), "j": ju[drawn].tolist(), "y": _round(y_all[drawn], 4),
               "map_similarity_of_map_best_earlier": round(float(oracle.mean()), 4),
               "map_similarity_of_average_earlier_pair": round(float(S[earlier].mean()), 4)}
    timings["weights_s"] = round(time.time() - t0, 2)

    # 4. the plan on the layers x units grid; parameters saved measured by sharing a copy
    t0 = time.time()
    # methods that read calibration text read the report's text, unless told otherwise
    calib = {"calib": text} if "calib" in get_method(method).config.options() else {}
    plan = make_plan(model, ratio, method, tokenizer=tokenizer, progress=progress, **{**calib, **(plan_kwargs or {})})
    roots = plan.roots()
    state = np.zeros((L, U), dtype=int)  # 0 kept, 1 source of a shared unit, 2 shared, 3 pruned
    for src in roots.values():
        state[src] = 1
    for u in roots:
        state[u] = 2
    for p in plan.pruned:
        state[tuple(p)] = 3
    p0, _ = unique_parameters(model)
    shared = share(copy.deepcopy(model), plan)
    p1, _ = unique_parameters(shared)
    del shared
    plan_data = {
        "method": plan.method, "ratio": ratio, "metric": plan.metric, "units_total": layout.units_total,
        "units_shared": plan.units_shared, "units_pruned": len(plan.pruned),
        "params_original": p0, "params_shared": p1, "params_saved": p0 - p1,
        "state": state.tolist(),
        "sources": [{"layer": a[0], "unit": a[1], "source_layer": r[0], "source_unit": r[1]}
                    for a, r in sorted(roots.items())],
        "plan": plan.to_dict(),
    }
    timings["plan_s"] = round(time.time() - t0, 2)

    data = {
        "model": name or getattr(model.config, "_name_or_path", "") or model.config.model_type,
        "layout": layout.to_dict(),
        "unit": layout.describe_unit(),
        "q_heads_per_unit": layout.q_heads_per_unit,
        "calibration": {"text": text, "windows": int(ids.shape[0]), "window": int(ids.shape[1]),
                        "tokens": int(ids.numel())},
        "definitions": {
            "attention_similarity": "mean over query positions of the cosine between two heads' attention "
                                    "rows, averaged over windows",
            "layer_similarity": "mean over h of the similarity of head (l, h) and head (l', h); "
                                "mean_map_matrix: similarity of the layers' mean maps",
            "best": "most similar head/layer in any other layer",
            "pairs": "all pairs of query heads in different layers",
        },
        "summary": summary,
        "layers": layers,
        "heads": heads,
        "focus": focus,
        "weight_vs_attention": wva,
        "scatter": scatter,
        "plan": plan_data,
        "timings": timings,
    }
    return data, S


# -- drawing ------------------------------------------------------------------------------------------------

def _unit_lines(ax, H: int, gq: int) -> None:
    for x in range(gq, H, gq):
        ax.axvline(x - 0.5, color="white", lw=1.2)


def figures(data: dict) -> dict:
    """The report's matplotlib figures, drawn only from `data` (what report.json holds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    figs = {}
    lay = data["layout"]
    L, H = lay["num_layers"], lay["num_heads"]

    # 1. layers x layers
    M = np.array(data["layers"]["matrix"])
    off = M[~np.eye(L, dtype=bool)]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(M, cmap="viridis", vmin=off.min(), vmax=off.max())
    best = data["layers"]["best"]
    ax.scatter([b["match"] for b in best], [b["layer"] for b in best], marker="s", s=40, facecolors="none",
               edgecolors="red", linewidths=1.3, label="most similar other layer")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title("Layer-wise attention-map similarity")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    fig.colorbar(im, ax=ax, label="mean row cosine (diagonal = 1, off scale)")
    fig.tight_layout()
    figs["layers"] = fig

    # 2. one head vs all heads, on the layers x heads grid
    f = data["focus"]
    G = np.array(f["grid"])
    others = G.copy()
    others[f["head"][0], f["head"][1]] = np.nan
    fig, ax = plt.subplots(figsize=(max(3.6, 0.42 * H + 2.2), max(4.0, 0.2 * L + 1.6)))
    im = ax.imshow(G, cmap="magma", aspect="auto", vmin=np.nanmin(others), vmax=np.nanmax(others))
    _unit_lines(ax, H, data["q_heads_per_unit"])
    ax.scatter([m["head"] for m in f["matches"]], [m["layer"] for m in f["matches"]], marker="o", s=60,
               facecolors="none", edgecolors="cyan", linewidths=1.6, label=f"top {f['top']}")
    ax.scatter([f["head"][1]], [f["head"][0]], marker="*", s=160, color="lime", edgecolors="black",
               label="chosen head")
    ax.set_xlabel("query head" + (" (lines separate units)" if data["q_heads_per_unit"] > 1 else ""))
    ax.set_ylabel("layer")
    ax.set_title(f"Similarity to head ({f['head'][0]}, {f['head'][1]})", fontsize=10)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=2, fontsize=8, frameon=False)
    fig.colorbar(im, ax=ax, label="attention-map similarity")
    fig.tight_layout()
    figs["head"] = fig

    # 3. weights vs maps
    metrics = [m for m, v in data["weight_vs_attention"].items() if "x" in v]
    sc = data["scatter"]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.0 * max(1, len(metrics)), 3.2), sharey=True,
                             squeeze=False)
    for ax, m in zip(axes[0][: len(metrics)], metrics, strict=True):
        w = data["weight_vs_attention"][m]
        ax.scatter(w["x"], sc["y"], s=2, alpha=0.25, color="tab:blue", rasterized=True, linewidths=0)
        ax.set_title(f"{m}: Spearman {w['spearman']:.3f}", fontsize=10)
        ax.set_xlabel(f"weight cosine ({m})")
        ax.xaxis.set_major_locator(MaxNLocator(4))
    axes[0][0].set_ylabel("attention-map similarity")
    fig.suptitle(f"{sc['pairs_drawn']:,} of {sc['pairs_total']:,} head pairs in different layers", fontsize=9)
    fig.tight_layout()
    figs["weights"] = fig

    # 4. the plan
    p = data["plan"]
    st = np.array(p["state"])
    U = st.shape[1]
    colors = ["#d9d9d9", "#4c72b0", "#dd8452", "#c44e52"]
    fig, ax = plt.subplots(figsize=(max(3.4, 0.55 * U + 2.4), max(4.0, 0.2 * L + 1.6)))
    ax.imshow(st, cmap=ListedColormap(colors), vmin=-0.5, vmax=3.5, aspect="auto")
    fs = max(4, min(7, int(160 / max(U, 1))))
    for s in p["sources"]:
        ax.text(s["unit"], s["layer"], f"{s['source_layer']}.{s['source_unit']}", ha="center", va="center",
                fontsize=fs, color="black")
    from matplotlib.patches import Patch

    names = ("kept", "source", "shared (from l.u)", "pruned")
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, names, strict=True)],
              loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=7, frameon=False)
    ax.set_xticks(range(U))
    ax.set_xlabel("unit")
    ax.set_ylabel("layer")
    fig.tight_layout()
    figs["plan"] = fig
    return figs


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>headshare report: {model}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; color: #222; line-height: 1.4; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 1.6em; }}
img {{ max-width: 100%; border: 1px solid #ddd; }} .cap {{ font-size: 0.9em; color: #444; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.row {{ display: flex; gap: 1.5em; align-items: flex-start; }} .row img {{ max-width: 62%; }}
.row p {{ flex: 1; min-width: 16em; margin-top: 2em; }}
</style></head>
<body data-figures="{n_figs}" data-figures-loaded="pending">
<h1>headshare report: {model}</h1>
<p>{layers} layers &times; {heads} query heads ({kv} key/value heads); unit = {unit}.
Attention maps from {windows} windows of {window} tokens of <code>{text}</code>.
Similarity of two maps = {definition}.</p>
{body}
<script>
// marks the page once every figure has decoded, so a headless browser can tell loaded from broken
window.addEventListener("load", function () {{
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-figures-loaded", ok === imgs.length ? String(ok) : "broken:" + ok);
}});
</script>
</body></html>
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_page(data: dict, pngs: dict[str, bytes]) -> str:
    """One self-contained page: the figures embedded as base64 PNGs, captions and the key numbers."""
    s, lay, f, p, sc = data["summary"], data["layout"], data["focus"], data["plan"], data["scatter"]
    rows = "".join(
        f"<tr><td>{m}</td><td>{v['spearman']:.3f}</td><td>{v['spearman_abs']:.3f}</td>"
        f"<td>{v['map_similarity_of_weight_best_earlier']:.3f}</td></tr>"
        if "spearman" in v else f"<tr><td>{m}</td><td colspan=3>{html.escape(v['skipped'])}</td></tr>"
        for m, v in data["weight_vs_attention"].items())
    body = f"""
<h2>1. Layer-wise attention-map similarity</h2>
<div class="row">{_img(pngs["layers"], "layer-wise similarity heatmap")}
<p class="cap">Layer l against layer l' is the mean similarity of head (l, h) and head (l', h) over h, the
pairing that sharing whole layers imposes. Each row's red square is that layer's most similar other layer.
Best-match similarity of a layer: mean {s['layer_best_mean']:.3f}, median {s['layer_best_median']:.3f};
all layer pairs: mean {s['layer_pair_mean']:.3f}. Comparing the layers' mean maps instead (smoother, so
more alike) gives a best-match mean of {s['layer_mean_map_best_mean']:.3f}.</p></div>
<h2>2. Head-wise attention-map similarity</h2>
<div class="row">{_img(pngs["head"], "head-wise similarity grid")}
<p class="cap">Similarity of head ({f['head'][0]}, {f['head'][1]}) to every query head; circles mark its
top {f['top']} heads in other layers, which come from {f['distinct_layers']} different layers.
Best-match similarity of a head (any other layer): mean {s['head_best_mean']:.3f}, median
{s['head_best_median']:.3f}, against {s['layer_best_mean']:.3f} for whole layers; all head pairs in
different layers: mean {s['head_pair_mean']:.3f}. On average a head's top {f['top']} come from
{s['mean_distinct_layers_in_top']:.1f} layers.</p></div>
<h2>3. Does weight similarity predict attention-map similarity?</h2>
{_img(pngs["weights"], "weight vs attention-map similarity scatter")}
<p class="cap">Each point is a pair of query heads in different layers ({sc['pairs_drawn']:,} of
{sc['pairs_total']:,} drawn; correlations use all). The x axis is the paper's signed cosine; since a
head's q and k can both flip sign without changing its map, the rank correlation of |cosine| is given
too. The last column: each head takes its most weight-similar head in an earlier layer, as DirectShare
does; how similar are their attention maps, on average? Taking the most map-similar earlier head instead
gives {sc['map_similarity_of_map_best_earlier']:.3f}, an average earlier head
{sc['map_similarity_of_average_earlier_pair']:.3f}.</p>
<table><tr><th>match function</th><th>Spearman &rho;</th><th>&rho; of |cosine|</th><th>map similarity of weight-chosen earlier match</th></tr>
{rows}</table>
<h2>4. The sharing plan</h2>
<div class="row">{_img(pngs["plan"], "sharing plan grid")}
<p class="cap">Method <b>{html.escape(p['method'])}</b> at ratio {p['ratio']}: {p['units_shared']} of
{p['units_total']} units shared{f", {p['units_pruned']} pruned" if p['units_pruned'] else ""}; a shared cell
names the unit (layer.unit) whose weights it reads. Parameters {p['params_original']:,} &rarr;
{p['params_shared']:,}: {p['params_saved']:,} saved
({100 * p['params_saved'] / p['params_original']:.2f} % of the model).</p></div>
"""
    return _PAGE.format(model=html.escape(str(data["model"])), n_figs=len(pngs), layers=lay["num_layers"],
                        heads=lay["num_heads"], kv=lay["num_kv_heads"], unit=html.escape(data["unit"]),
                        windows=data["calibration"]["windows"], window=data["calibration"]["window"],
                        text=html.escape(data["calibration"]["text"]),
                        definition=data["definitions"]["attention_similarity"], body=body)


@dataclass
class Report:
    data: dict
    figures: dict = field(default_factory=dict)
    out: Path | None = None


def write(data: dict, out: str | Path, head_matrix: np.ndarray | None = None) -> Report:
    """Draw `data` and write index.html, the PNGs, report.json (and attention_similarity.npy) into `out`."""
    import matplotlib.pyplot as plt

    t0 = time.time()
    figs = figures(data)
    pngs = {name: _png(fig) for name, fig in figs.items()}
    for fig in figs.values():
        plt.close(fig)
    data.setdefault("timings", {})["draw_s"] = round(time.time() - t0, 2)
    page = html_page(data, pngs)
    # everything is drawn first and the files appear together: a failure leaves no half report
    out = Path(out)
    with atomic_dir(out, force=True) as tmp:
        for name, png in pngs.items():
            (tmp / f"{name}.png").write_bytes(png)
        (tmp / "report.json").write_text(json.dumps(data, indent=1) + "\n")
        if head_matrix is not None:
            np.save(tmp / "attention_similarity.npy", head_matrix.astype(np.float32))
        (tmp / "index.html").write_text(page)
    return Report(data, figs, out)


def report(model, tokenizer, out: str | Path, **kw) -> Report:
    """Compute the analysis for `model` and write the report into directory `out`.

    Keyword arguments go to `compute` (text, windows, window, head, top, ratio, method, plan_kwargs, ...).

    >>> r = report(model, tok, "report/", ratio=0.3)   # doctest: +SKIP
    """
    t0 = time.time()
    data, S = compute(model, tokenizer, **kw)
    data["timings"]["total_s"] = round(time.time() - t0, 2)
    return write(data, out, S)
