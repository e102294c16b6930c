"""The rows as a perplexity-against-parameters-removed plot."""

from __future__ import annotations

from pathlib import Path

from .settings import split_method
from .tables import is_pruning


def plot_rows(rows: list[dict], path: str | Path, title: str | None = None) -> None:
    """PNG of perplexity (log scale) against the share of the whole model removed, one line per method;
    methods that only prune are dashed, so the sharing-vs-pruning comparison reads at a glance; rows on
    query-head units ("METHOD@query") have square markers and the colour of their method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next((r for r in rows if r["method"] == "original"), None)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "original"))
    # one colour per method, whatever its unit kind: "fitprune" and "fitprune@query" differ by marker only
    names = list(dict.fromkeys(split_method(m)[0] for m in methods))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for method in methods:
        name, unit = split_method(method)
        pts = sorted((100 * r["params_removed"] / r["params_total"], r["perplexity"])
                     for r in rows if r["method"] == method)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="s" if unit else "o", label=method,
                color=colours(names.index(name)), linestyle="--" if is_pruning(method) else "-",
                linewidth=1.0 if unit else 1.6)
    ax.set_yscale("log")
    if base is not None:
        ax.axhline(base["perplexity"], color="grey", linewidth=0.8, label="original")
        # the methods worth comparing sit within a few times the original; far worse ones leave the top
        top = max(r["perplexity"] for r in rows)
        ax.set_ylim(0.95 * base["perplexity"], min(top * 1.1, 4 * base["perplexity"]))
    ax.set_xlabel("parameters removed (% of the whole model)")
    ax.set_ylabel("perplexity (log scale)")
    if rows:
        r = rows[0]
        ax.set_title(title or f"{r['model']}: perplexity on {r['tokens']:,} tokens of {r['text'] if isinstance(r['text'], str) else r['text'][0]}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(methods) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
