"""Drawing the report's figures from its data alone, so report.json can be redrawn later."""

from __future__ import annotations

import numpy as np


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

