"""The report's numbers: one function per panel, and `compute`, which runs them and assembles report.json."""

from __future__ import annotations

import copy
import time

import numpy as np

from ..arch import layout_of
from ..errors import HeadshareError
from ..similarity import METRICS
from .attention import attention_similarity
from .stats import cosine_matrix, rounded, spearman
from .weights import head_weight_vectors

MAX_SCATTER_POINTS = 20000  # per match function; the correlation always uses every pair

DEFINITIONS = {
    "attention_similarity": "mean over query positions of the cosine between two heads' attention "
                            "rows, averaged over windows",
    "layer_similarity": "mean over h of the similarity of head (l, h) and head (l', h); "
                        "mean_map_matrix: similarity of the layers' mean maps",
    "best": "most similar head/layer in any other layer",
    "pairs": "all pairs of query heads in different layers",
}


def other_layer_mask(L: int, H: int) -> np.ndarray:
    """(L*H, L*H) bool: the two heads sit in different layers."""
    layer = np.repeat(np.arange(L), H)
    return layer[:, None] != layer[None, :]


def check_focus(L: int, H: int, head: tuple[int, int] | None, top: int | None) -> tuple[tuple[int, int], int]:
    """The chosen head (default head 0 of the last layer) and how many matches to mark (default H)."""
    head = (L - 1, 0) if head is None else tuple(head)
    if not (0 <= head[0] < L and 0 <= head[1] < H):
        raise HeadshareError(f"--head {head[0]},{head[1]} is outside this model's {L} layers x {H} heads")
    top = H if top is None else top
    if not 1 <= top < L * H:
        raise HeadshareError(f"top must be in [1, {L * H - 1}], got {top}")
    return head, top


def layer_panel(S_layers: np.ndarray, S_mean_maps: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """Panel 1: the layers x layers matrices and each layer's best other layer.

    Returns (the panel's data, each layer's best-match similarity, each layer's best mean-map similarity)."""
    L = S_layers.shape[0]
    off_diag = ~np.eye(L, dtype=bool)
    layer_best = np.where(off_diag, S_layers, -np.inf).argmax(1)
    mean_map_best = np.where(off_diag, S_mean_maps, -np.inf).max(1)
    layers = {
        "matrix": rounded(S_layers),
        "best": [{"layer": i, "match": int(j), "similarity": round(float(S_layers[i, j]), 5)}
                 for i, j in enumerate(layer_best)],
    }
    layers["mean_map_matrix"] = rounded(S_mean_maps)
    return layers, S_layers[np.arange(L), layer_best], mean_map_best


def head_panel(S: np.ndarray, L: int, H: int, top: int) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Each head's best match in another layer, and from how many layers its `top` matches come.

    Returns (the data, each head's best-match similarity, each head's top matches, their distinct layers)."""
    Sh = np.where(other_layer_mask(L, H), S, -np.inf)
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
    return heads, head_best_sim, top_idx, distinct_layers


def summarise(S: np.ndarray, S_layers: np.ndarray, H: int, layer_best_sim: np.ndarray,
              mean_map_best: np.ndarray, head_best_sim: np.ndarray, heads: dict) -> dict:
    """The headline numbers: best-match and all-pair similarities of layers against heads."""
    L = S_layers.shape[0]
    return {
        "layer_best_mean": round(float(layer_best_sim.mean()), 4),
        "layer_best_median": round(float(np.median(layer_best_sim)), 4),
        "head_best_mean": round(float(head_best_sim.mean()), 4),
        "head_best_median": round(float(np.median(head_best_sim)), 4),
        "head_pair_mean": round(float(S[other_layer_mask(L, H)].mean()), 4),
        "layer_pair_mean": round(float(S_layers[~np.eye(L, dtype=bool)].mean()), 4),
        "layer_mean_map_best_mean": round(float(mean_map_best.mean()), 4),
        "layer_mean_map_best_median": round(float(np.median(mean_map_best)), 4),
        "mean_distinct_layers_in_top": heads["mean_distinct_layers_in_top"],
    }


def focus_panel(S: np.ndarray, L: int, H: int, head: tuple[int, int], top: int, top_idx: np.ndarray,
                distinct_layers: np.ndarray) -> dict:
    """Panel 2: the chosen head's similarity to every head, and its top matches in other layers."""
    c = head[0] * H + head[1]
    return {
        "head": list(head),
        "top": top,
        "grid": rounded(S[c].reshape(L, H)),
        "matches": [{"layer": int(j) // H, "head": int(j) % H, "similarity": round(float(S[c, j]), 5)}
                    for j in top_idx[c]],
        "distinct_layers": int(distinct_layers[c]),
    }


def weights_panel(model, S: np.ndarray, L: int, H: int, seed: int, max_points: int) -> tuple[dict, dict]:
    """Panel 3: weight similarity per match function against map similarity, over all pairs of heads in
    different layers (the pairs sharing chooses from); at most `max_points` of them are kept for the plot.

    Returns ({metric: correlations and drawn x values}, the drawn pairs and their map similarity)."""
    iu, ju = np.triu_indices(L * H, k=1)
    keep = other_layer_mask(L, H)[iu, ju]
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
            "x": rounded(x_all[drawn], 4),
        }
    scatter = {"pairs_total": int(len(iu)), "pairs_drawn": int(len(drawn)),
               "i": iu[drawn].tolist(), "j": ju[drawn].tolist(), "y": rounded(y_all[drawn], 4),
               "map_similarity_of_map_best_earlier": round(float(oracle.mean()), 4),
               "map_similarity_of_average_earlier_pair": round(float(S[earlier].mean()), 4)}
    return wva, scatter


def plan_panel(model, tokenizer, *, text: str, ratio: float, method: str, plan_kwargs: dict | None,
               progress: bool) -> dict:
    """Panel 4: the plan on the layers x units grid, and the parameters saved, measured by sharing a copy."""
    from ..methods import get_method, make_plan
    from ..sharing import share, unique_parameters

    layout = layout_of(model.config)
    L, U = layout.num_layers, layout.units_per_layer
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
    return {
        "method": plan.method, "ratio": ratio, "metric": plan.metric, "units_total": layout.units_total,
        "units_shared": plan.units_shared, "units_pruned": len(plan.pruned),
        "params_original": p0, "params_shared": p1, "params_saved": p0 - p1,
        "state": state.tolist(),
        "sources": [{"layer": a[0], "unit": a[1], "source_layer": r[0], "source_unit": r[1]}
                    for a, r in sorted(roots.items())],
        "plan": plan.to_dict(),
    }


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
    from ..data import load_text, token_blocks

    timings = {}
    layout = layout_of(model.config)
    L, H = layout.num_layers, layout.num_heads
    head, top = check_focus(L, H, head, top)

    t0 = time.time()
    ids = token_blocks(tokenizer, load_text(text, split="calib"), window, max_blocks=windows)
    S, S_mean_maps = (m.numpy() for m in attention_similarity(model, ids, progress=progress))
    # layer l against layer l': head h against head h, averaged over h
    S_layers = np.einsum("ahbh->ab", S.reshape(L, H, L, H)) / H
    timings["attention_s"] = round(time.time() - t0, 2)

    layers, layer_best_sim, mean_map_best = layer_panel(S_layers, S_mean_maps)
    heads, head_best_sim, top_idx, distinct_layers = head_panel(S, L, H, top)
    summary = summarise(S, S_layers, H, layer_best_sim, mean_map_best, head_best_sim, heads)
    focus = focus_panel(S, L, H, head, top, top_idx, distinct_layers)

    t0 = time.time()
    wva, scatter = weights_panel(model, S, L, H, seed, max_points)
    timings["weights_s"] = round(time.time() - t0, 2)

    t0 = time.time()
    plan_data = plan_panel(model, tokenizer, text=text, ratio=ratio, method=method, plan_kwargs=plan_kwargs,
                           progress=progress)
    timings["plan_s"] = round(time.time() - t0, 2)

    data = {
        "model": name or getattr(model.config, "_name_or_path", "") or model.config.model_type,
        "layout": layout.to_dict(),
        "unit": layout.describe_unit(),
        "q_heads_per_unit": layout.q_heads_per_unit,
        "calibration": {"text": text, "windows": int(ids.shape[0]), "window": int(ids.shape[1]),
                        "tokens": int(ids.numel())},
        "definitions": dict(DEFINITIONS),
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
