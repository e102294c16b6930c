"""The rows as a markdown table, and the sharing-against-pruning comparison at equal parameters removed."""

from __future__ import annotations

from .settings import split_method


def _mb(x) -> str:
    return "" if x is None else f"{x / 1e6:.1f}"


def _ms(x) -> str:
    return "" if x is None else f"{x * 1e3:.1f}"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (sizes in MB = 1e6 bytes, times in ms)."""
    head = ["method", "ratio", "units removed", "attn params removed", "params removed", "perplexity",
            "ppl / orig", "KL", "top-1", "weights MB", "checkpoint MB", "peak RSS MB", "prefill ms", "decode ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        attn_pct = 100 * r["attn_params_removed"] / r["attn_params_total"] if r["attn_params_total"] else 0.0
        cells = [r["method"], f"{r['ratio']:g}", f"{r['units_removed']}/{r['units_total']}",
                 f"{r['attn_params_removed']:,} ({attn_pct:.1f} %)", f"{r['params_removed']:,}",
                 f"{r['perplexity']:.3f}", f"{r['perplexity'] / r['reference_perplexity']:.3f}",
                 f"{r['kl']:.4f}", f"{r['top1_agreement']:.3f}", _mb(r["weight_bytes"]), _mb(r["checkpoint_bytes"]),
                 _mb(r.get("peak_rss_bytes")), _ms(r.get("prefill_s")), _ms(r.get("decode_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PRUNING = ("prune", "fitprune")  # methods that remove units without sharing anything


def is_pruning(method: str, pruning: tuple[str, ...] = PRUNING) -> bool:
    """Whether a row's method only prunes (whatever its unit kind). `pruning` names those methods; a
    benchmark adds the names of its own pruning controls that are no registered method."""
    return split_method(method)[0] in pruning


def budget_groups(rows: list[dict], tolerance: float = 0.02) -> list[list[dict]]:
    """The rows (original left out) in groups that remove the same parameters, smallest first: within
    `tolerance` of the group's smallest. Ratios alone do not say it: 40 % of SmolLM2's query-head units
    remove what 30 % of its key/value units do, and a basis spends its budget only to within a few rows
    (a method whose ranks come from a grid, less closely still)."""
    groups: list[list[dict]] = []
    for r in sorted((r for r in rows if r["method"] != "original"), key=lambda r: (r["params_removed"], r["ratio"])):
        if groups and r["params_removed"] <= groups[-1][0]["params_removed"] * (1 + tolerance):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def group_ratio(group: list[dict]) -> float:
    """The ratio that names a budget group: that of its default-unit rows where it has any."""
    plain = [r["ratio"] for r in group if split_method(r["method"])[1] is None]
    return min(plain or [r["ratio"] for r in group])


def sharing_gap(rows: list[dict], pruning: tuple[str, ...] = PRUNING) -> list[dict]:
    """Per budget (`budget_groups`): the best row that shares against the best that only prunes
    (`is_pruning` with `pruning`).

    `gap` is best sharing perplexity / best pruning perplexity - 1: negative means sharing wins."""
    out = []
    for here in budget_groups(rows):
        share = min((r for r in here if not is_pruning(r["method"], pruning)), key=lambda r: r["perplexity"],
                    default=None)
        prune = min((r for r in here if is_pruning(r["method"], pruning)), key=lambda r: r["perplexity"],
                    default=None)
        if share and prune:
            out.append({"ratio": group_ratio(here), "sharing": share["method"], "sharing_ppl": share["perplexity"],
                        "pruning": prune["method"], "pruning_ppl": prune["perplexity"],
                        "gap": share["perplexity"] / prune["perplexity"] - 1,
                        "model_fraction": share["params_removed"] / share["params_total"]})
    return out
