"""The rows as a markdown table, and the sharing-against-pruning comparison at equal parameters removed."""

from __future__ import annotations

from ..errors import HeadshareError
from .alternatives import is_alternative
from .settings import split_method


def _mb(x) -> str:
    return "" if x is None else f"{x / 1e6:.1f}"


def _ms(x) -> str:
    return "" if x is None else f"{x * 1e3:.1f}"


def perplexity_on(row: dict, text: str | None = None) -> float:
    """A row's perplexity on evaluation text `text` (a source it was scored on), or on its first one."""
    if text is None:
        return row["perplexity"]
    scored = row.get("texts") or {}
    if text not in scored:
        raise HeadshareError(f"row {row['method']} {row['ratio']:g} was not scored on {text!r}: "
                             f"{', '.join(scored) or 'one text only'}")
    return scored[text]["perplexity"]


def _other_texts(rows: list[dict]) -> list[str]:
    """The evaluation texts after each row's first, in order of appearance."""
    names: dict[str, None] = {}
    for r in rows:
        for name in list(r.get("texts") or {})[1:]:
            names.setdefault(name, None)
    return list(names)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (sizes in MB = 1e6 bytes, times in ms), with a column of perplexity
    (and its ratio to the original's) for every evaluation text after the first."""
    others = _other_texts(rows)
    head = ["method", "ratio", "units removed", "attn params removed", "params removed", "perplexity",
            "ppl / orig", *(f"ppl {name} (/ orig)" for name in others), "KL", "top-1", "weights MB",
            "checkpoint MB", "peak RSS MB", "prefill ms", "decode ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        attn_pct = 100 * r["attn_params_removed"] / r["attn_params_total"] if r["attn_params_total"] else 0.0
        cells = [r["method"], f"{r['ratio']:g}", f"{r['units_removed']}/{r['units_total']}",
                 f"{r['attn_params_removed']:,} ({attn_pct:.1f} %)", f"{r['params_removed']:,}",
                 f"{r['perplexity']:.3f}", f"{r['perplexity'] / r['reference_perplexity']:.3f}",
                 *(_text_cell((r.get("texts") or {}).get(name)) for name in others),
                 f"{r['kl']:.4f}", f"{r['top1_agreement']:.3f}", _mb(r["weight_bytes"]), _mb(r["checkpoint_bytes"]),
                 _mb(r.get("peak_rss_bytes")), _ms(r.get("prefill_s")), _ms(r.get("decode_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _text_cell(scored: dict | None) -> str:
    if scored is None:
        return ""
    return f"{scored['perplexity']:.3f} ({scored['perplexity'] / scored['reference_perplexity']:.3f})"


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


def sharing_gap(rows: list[dict], pruning: tuple[str, ...] = PRUNING, text: str | None = None) -> list[dict]:
    """Per budget (`budget_groups`): the best row that shares against the best that only prunes
    (`is_pruning` with `pruning`), by perplexity on evaluation text `text` (default: each row's first).

    `gap` is best sharing perplexity / best pruning perplexity - 1: negative means sharing wins. Whole-model
    alternatives (`alternatives.ALTERNATIVES`) are neither: they join the group of their ratio as "whole", the
    best of them, with the share of the model they really removed ("whole_fraction")."""
    def ppl(r: dict) -> float:
        return perplexity_on(r, text)

    out = []
    for group in budget_groups([r for r in rows if not is_alternative(r["method"])]):
        ratio = group_ratio(group)
        wholes = [r for r in rows if is_alternative(r["method"]) and r["ratio"] == ratio]
        share = min((r for r in group if not is_pruning(r["method"], pruning)), key=ppl, default=None)
        prune = min((r for r in group if is_pruning(r["method"], pruning)), key=ppl, default=None)
        whole = min(wholes, key=ppl, default=None)
        if share and prune:
            out.append({"ratio": ratio, "sharing": share["method"], "sharing_ppl": ppl(share),
                        "pruning": prune["method"], "pruning_ppl": ppl(prune),
                        **({"whole": whole["method"], "whole_ppl": ppl(whole),
                            "whole_fraction": whole["params_removed"] / whole["params_total"]} if whole else {}),
                        "gap": ppl(share) / ppl(prune) - 1,
                        "model_fraction": share["params_removed"] / share["params_total"]})
    return out
