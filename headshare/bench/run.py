"""The whole benchmark: every (method, ratio) measured, rows appended to the JSON file as they finish."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import HeadshareError
from ..files import atomic_write_text
from .alternatives import is_alternative
from .measure import measure
from .plot import plot_rows
from .reference import CachedReference
from .rows import read_rows, write_rows
from .settings import DEFAULT_METHODS, DEFAULT_RATIOS, bench_config, resolve_methods
from .tables import markdown_table


def _ratio_key(r: float) -> float:
    return round(float(r), 6)


def run_bench(model: str = "smollm2-135m", ratios=DEFAULT_RATIOS, methods=DEFAULT_METHODS,
              out: str | Path = "bench.json", *, text: str | list[str] = "builtin", calib: str = "builtin:calib",
              calib_tokens: int | None = None, max_tokens: int | None = None, window: int = 512, seed: int = 0,
              options: dict | None = None, resume: bool = False, force: bool = False, md: str | Path | None = None,
              plot: str | Path | None = None, run_probe: bool = True, progress: bool = True,
              device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              offload: bool = False) -> list[dict]:
    """Measure every (method, ratio) and append the rows to the JSON list `out`; returns all rows.

    Args:
        model: alias, local directory or hub id of the original model.
        text / calib: evaluation and calibration text sources (see `headshare.data.load_text`); `text` may list
            several (in domain and out of it, say): each row is scored on every one, the first is its own.
        max_tokens: evaluate on at most this many tokens of `text`.
        options: method options, {key: value} for every method that has the option, {"method.key": value}
            for one (`parse_options` reads them from --option texts).
        resume: keep the rows already in `out` (made with the same settings) and only add missing ones.
        force: start over even if `out` exists.
        md / plot: also write the markdown table / the PNG plot there.
        run_probe: measure memory and speed in a fresh process per row (else those keys are None); the probe
            loads each checkpoint on the CPU in `dtype`, whatever `device` is.
        device / dtype: where the models are loaded and in what (None: the CPU, float32).
        offload: keep the models on the CPU and calibrate one block at a time on `device` (evaluation then
            runs on the CPU).
    """
    from tqdm.auto import tqdm

    from ..data import load_text
    from ..fetch import load_model

    methods = resolve_methods(methods)
    ratios = list(dict.fromkeys(_ratio_key(r) for r in ratios))
    for r in ratios:
        if not 0 <= r < 1:
            raise HeadshareError(f"ratio must be in [0, 1), got {r}")
    # float32 is stored as None, so rows that hold no dtype (all float32) stay resumable
    texts = [text] if isinstance(text, str) else list(dict.fromkeys(text))
    if not texts:
        raise HeadshareError("no evaluation text given")
    settings = {"model": model, "text": texts[0] if len(texts) == 1 else texts, "calib": calib, "calib_tokens": calib_tokens,
                "max_tokens": max_tokens, "window": window, "seed": seed, "options": options or None,
                "dtype": None if dtype in (None, torch.float32) else str(dtype).removeprefix("torch.")}
    for m in methods:
        for r in ratios:
            if not is_alternative(m):
                bench_config(m, r, settings)  # a bad option or value fails before anything loads
    out = Path(out)
    rows = read_rows(out, settings, resume, force)
    done = {(r["method"], _ratio_key(r["ratio"])) for r in rows}
    todo = [(m, r) for m in methods for r in ratios if (m, r) not in done]
    if todo:
        original, tok = load_model(model, dtype=dtype,
                                   device="cpu" if offload else device)
        if tok is None:
            raise HeadshareError(f"{model} has no tokenizer; save one beside the weights")
        eval_text = {name: load_text(name, split="eval") for name in texts}
        reference = CachedReference(original)
        baseline = next((r for r in rows if _ratio_key(r["ratio"]) == 0), None)
        bar = tqdm(todo, desc="bench", unit="row", disable=not progress)
        for method, ratio in bar:
            bar.set_postfix_str(f"{method} {ratio:g}")
            if ratio == 0 and baseline is not None:
                row = {**baseline, "method": method}  # the unchanged model: same numbers for every method
            else:
                row = measure(method, ratio, original, reference, tok, eval_text, settings,
                              run_probe=run_probe, progress=progress,
                              plan_device=torch.device(device) if offload and device is not None else None)
                if ratio == 0:
                    baseline = row
            rows.append(row)
            write_rows(out, rows)
    order = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"], r["ratio"]))
    write_rows(out, rows)
    if md is not None:
        atomic_write_text(md, markdown_table(rows))
    if plot is not None:
        plot_rows(rows, plot)
    return rows
