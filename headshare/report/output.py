"""Writing the report's files, and `report`: compute then write."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_dir
from .analysis import compute
from .figures import figures
from .page import html_page, png_bytes


@dataclass
class Report:
    """A written report: its data (report.json), the matplotlib figures and the directory."""

    data: dict
    figures: dict = field(default_factory=dict)
    out: Path | None = None


def write(data: dict, out: str | Path, head_matrix: np.ndarray | None = None) -> Report:
    """Draw `data` and write index.html, the PNGs, report.json (and attention_similarity.npy) into `out`."""
    import matplotlib.pyplot as plt

    t0 = time.time()
    figs = figures(data)
    pngs = {name: png_bytes(fig) for name, fig in figs.items()}
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
