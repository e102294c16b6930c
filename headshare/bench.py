"""The quality benchmark: every plan method at the same number of removed attention units.

For each (method, ratio) a fresh copy of the model gets the method's plan and is shared; then

- quality: perplexity on the evaluation text, and KL divergence and top-1 agreement of the
  next-token distributions against the original model (`headshare.evaluate.compare`);
- size: attention and total parameters removed, unique weight bytes in memory, and the bytes of
  the checkpoint `save_pretrained` writes (all files, no tokenizer);
- cost: in a fresh Python process that loads that checkpoint (`python -m headshare.bench probe DIR`),
  the median time of three 512-token forwards (`prefill_s`), the median time of one decoded token
  with the KV cache after a 128-token prompt (`decode_s`), the resident memory after loading
  (`rss_after_load_bytes`; memory-mapped weights count only once touched) and its peak while
  running them (`peak_rss_bytes`: python, torch, the weights, activations and cache).
  A fresh process because a process's peak RSS only ever grows: measured in the benchmark's own
  process it would report the largest model seen so far. The peak is reset after loading
  (/proc/self/clear_refs), so loader transients do not count; `peak_excludes_load` says whether
  the reset worked.

Ratio 0 is the unchanged model, measured once and reused for every method. Rows are appended to
the JSON file as they finish, so a crash keeps them and `resume=True` carries on.

    >>> rows = run_bench("smollm2-135m", [0, 0.3], ["directshare", "prune"], "out.json")   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .arch import arch_spec, blocks, layout_of
from .errors import HeadshareError
from .files import atomic_write_text
from .methods import METHODS, MethodConfig, get_method, make_plan, parse_option, split_method
from .plan import SharePlan
from .sharing import share, unique_parameters
from .structure import BASIS_NAME

DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.5)
DEFAULT_METHODS = ("directshare", "random", "layerwise", "prune")
# a row is reused by --resume only if it was made with the same settings
SETTING_KEYS = ("model", "text", "calib", "calib_tokens", "max_tokens", "window", "seed", "options", "dtype")
PROBE_KEYS = ("rss_after_load_bytes", "peak_rss_bytes", "peak_excludes_load", "prefill_s", "decode_s",
              "prefill_tokens", "decode_tokens", "decode_prompt_tokens")


def resolve_methods(names) -> list[str]:
    """Method names with "all" expanded to every registered method, in registration order; a name may end
    in "@UNIT" (`split_method`)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        for m in (list(METHODS) if name == "all" else [name]):
            if split_method(m)[0] not in METHODS:
                raise HeadshareError(f"unknown method {m!r}; registered: {', '.join(METHODS)}")
            if m not in out:
                out.append(m)
    if not out:
        raise HeadshareError("no methods given")
    return out


def parse_options(texts, methods) -> dict[str, object] | None:
    """`--option` texts (KEY=VALUE, or METHOD.KEY=VALUE for one method) as {key: value}, each parsed by the
    option's declared type; an option that none of `methods` has is refused. None when there are none."""
    out: dict[str, object] = {}
    for text in texts or ():
        key = text.partition("=")[0].strip()
        scope, _, name = key.rpartition(".")
        targets = [scope] if scope else [m for m in methods
                                         if name.replace("-", "_") in get_method(split_method(m)[0]).config.options()]
        if scope and scope not in methods:
            raise HeadshareError(f"option {text!r} is for method {scope!r}, which this run does not include")
        if not targets:
            raise HeadshareError(f"option {name!r} belongs to none of the methods {', '.join(methods)}")
        for m in targets:
            k, v = parse_option(get_method(split_method(m)[0]).config, f"{name}={text.partition('=')[2]}")
            out[f"{scope}.{k}" if scope else k] = v
    return out or None


def bench_config(method: str, ratio: float, settings: dict) -> MethodConfig:
    """The config one row runs: the shared settings (calib, calib_tokens, seed) and the --option values,
    each given to the methods whose config has that option."""
    base, unit = split_method(method)
    cfg = get_method(base).config
    names = cfg.options()
    kw = {k: settings[k] for k in ("calib", "calib_tokens", "seed") if k in names and settings.get(k) is not None}
    for key, v in (settings.get("options") or {}).items():
        scope, _, name = key.rpartition(".")
        if name in names and scope in ("", method):
            kw[name] = v
    if unit is not None:
        kw["unit"] = unit
    return cfg.from_dict({"ratio": ratio, **kw})


def _ratio_key(r: float) -> float:
    return round(float(r), 6)


class CachedReference(nn.Module):
    """The reference model, run once per distinct input: later calls replay its logits.

    On the first call with some input_ids the wrapped model runs and the input of its output
    embedding (the final hidden states, tokens x hidden floats) is kept; a repeated call applies only
    the output embedding to them, which gives the very same logits at a small fraction of the cost.
    Models that transform logits after the head (final_logit_softcapping) are always run in full.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.head = model.get_output_embeddings()
        self.cacheable = self.head is not None and getattr(model.config, "final_logit_softcapping", None) is None
        self._hidden: dict[tuple, torch.Tensor] = {}
        self.full_calls = 0

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, **kw):
        from transformers.modeling_outputs import CausalLMOutput

        key = (tuple(input_ids.shape), hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest())
        if self.cacheable and not kw and key in self._hidden:
            return CausalLMOutput(logits=self.head(self._hidden[key]))
        seen = {}
        handle = self.head.register_forward_pre_hook(lambda _m, a: seen.__setitem__("h", a[0].detach())) \
            if self.cacheable else None
        try:
            out = self.model(input_ids=input_ids, **kw)
        finally:
            if handle is not None:
                handle.remove()
        self.full_calls += 1
        h = seen.get("h")
        if self.cacheable and not kw and h is not None and h.shape[:2] == input_ids.shape:
            self._hidden[key] = h
        return out


def attention_params(model: nn.Module) -> int:
    """Parameters stored by the attention projections and any shared bases they read (each tensor once).

    The projections are those of the default unit, whatever unit a plan cuts: a grouped-query model's k/v
    count with query-head units too, so rows of either unit kind share one total."""
    layout = layout_of(model.config, "kv")
    attn = arch_spec(layout.model_type).attention
    seen: dict[int, int] = {}
    for block in blocks(model):
        for proj in layout.projections():
            for p in block.get_submodule(proj.path).parameters(recurse=False):
                seen[id(p)] = p.numel()
        basis = getattr(block.get_submodule(attn), BASIS_NAME, None)
        if basis is not None:
            seen[id(basis.weight)] = basis.weight.numel()
    return sum(seen.values())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- the probe: memory and speed in a fresh process ------------------------------------------------

def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS, so RSS counts live memory, not the loader's leftovers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.inference_mode()
def probe_checkpoint(path: str | Path, prefill_tokens: int = 512, decode_tokens: int = 32,
                     repeats: int = 3, prompt_tokens: int = 128, dtype: str = "float32") -> dict:
    """Load a checkpoint in this process (on the CPU, in `dtype`) and measure memory and speed (meant for a
    fresh process).

    prefill_s: median of `repeats` forwards of `prefill_tokens` tokens without cache. decode_s: median
    time of `decode_tokens` one-token steps with the KV cache, after a `prompt_tokens` prompt.
    """
    from .fetch import load_model

    model, _ = load_model(str(path), dtype=getattr(torch, dtype))
    cfg = model.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    n = min(prefill_tokens, max_pos - decode_tokens - 1) if max_pos else prefill_tokens
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    _release_freed_memory()
    rss = _status_bytes("VmRSS")
    reset = _reset_peak()
    model(input_ids=ids[:, :16])  # warm-up: first calls pay for lazy initialisation
    prefill = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        prefill.append(time.perf_counter() - t0)
    out = model(input_ids=ids[:, :prompt_tokens], use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode_tokens):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        steps.append(time.perf_counter() - t0)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return {"rss_after_load_bytes": rss, "peak_rss_bytes": _status_bytes("VmHWM"), "peak_excludes_load": reset,
            "prefill_s": statistics.median(prefill), "decode_s": statistics.median(steps),
            "prefill_tokens": n, "decode_tokens": decode_tokens, "decode_prompt_tokens": min(prompt_tokens, n)}


def probe(path: str | Path, threads: int | None = None, timeout: float = 900, **kw) -> dict:
    """`probe_checkpoint` run in a fresh Python process with `threads` torch threads."""
    cmd = [sys.executable, "-m", "headshare.bench", "probe", str(path),
           "--threads", str(threads or torch.get_num_threads())]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"probe of {path} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- one row ---------------------------------------------------------------------------------------

def measure(method: str, ratio: float, original: nn.Module, reference: nn.Module, tokenizer, text: str,
            settings: dict, run_probe: bool = True, progress: bool = True,
            make: Callable[[nn.Module], SharePlan] | None = None, plan_device: torch.device | None = None) -> dict:
    """Plan, share and measure one (method, ratio) on a copy of `original`; returns the row.

    `make`, if given, makes the plan from the copy instead of the registered `method` (for controls that
    are not methods, such as pruning exactly the units another method shares); `method` then only names
    the row. `plan_device`: where calibration computes (None: where the model is; a GPU for a model kept
    on the CPU: offloading)."""
    from .evaluate import compare

    params0, _ = unique_parameters(original)
    attn0 = attention_params(original)
    t0 = time.perf_counter()
    if ratio == 0:
        model, plan = original, None  # nothing to share: measure the model as it is
    else:
        model = copy.deepcopy(original)
        plan = make(model) if make is not None else make_plan(model, bench_config(method, ratio, settings),
                                                                tokenizer=tokenizer, progress=progress,
                                                                device=plan_device)
        share(model, plan)
    plan_s = time.perf_counter() - t0
    layout = layout_of(original.config, plan.unit_kind if plan else None)
    params, nbytes = unique_parameters(model)
    attn = attention_params(model)
    # ratio 0 compares the original with itself: its windows then run once, the second pass is replayed
    ev = compare(reference if model is original else model, reference, tokenizer, text, window=settings["window"], stride=settings["window"],
                 max_tokens=settings["max_tokens"], progress=progress)
    with tempfile.TemporaryDirectory(prefix="headshare-bench-") as tmp:
        ckpt = Path(tmp) / "model"
        model.save_pretrained(ckpt)
        ckpt_bytes = _dir_bytes(ckpt)
        speed = probe(ckpt, dtype=settings.get("dtype") or "float32") if run_probe else dict.fromkeys(PROBE_KEYS)
    if model is not original:
        del model
        gc.collect()
    return {
        "method": method, "ratio": ratio,
        "units_total": layout.units_total, "units_removed": plan.units_removed if plan else 0,
        "units_shared": plan.units_shared if plan else 0, "units_pruned": len(plan.pruned) if plan else 0,
        "units_based": plan.units_based(layout.units_per_layer) if plan else 0,
        "perplexity": ev["perplexity"], "nll": ev["nll"], "tokens": ev["tokens"],
        "kl": ev["kl"], "top1_agreement": ev["top1_agreement"], "reference_perplexity": ev["reference_perplexity"],
        "attn_params_total": attn0, "attn_params_removed": attn0 - attn,
        "params_total": params0, "params_removed": params0 - params,
        "weight_bytes": nbytes, "checkpoint_bytes": ckpt_bytes,
        **{k: speed.get(k) for k in PROBE_KEYS},
        "config": plan.config if plan else None,
        # autoshare: the candidate kept and every candidate's held-out calibration loss
        **({k: plan.notes[k] for k in ("chosen", "candidates")} if plan and "chosen" in plan.notes else {}),
        "plan_s": plan_s, "eval_s": ev["seconds"], "torch_threads": torch.get_num_threads(),
        "device": str(plan_device or next(original.parameters()).device),  # where planning computed
        "loadavg_1min": round(os.getloadavg()[0], 2),  # these machines are shared: say how busy this one was
        **settings,
    }


# -- the JSON file ------------------------------------------------------------------------------------

def read_rows(out: Path, settings: dict, resume: bool, force: bool) -> list[dict]:
    if not out.exists() or force:
        return []
    if not resume:
        raise FileExistsError(f"{out} exists; use --resume to continue it or --force to start over")
    try:
        rows = json.loads(out.read_text() or "[]")
    except json.JSONDecodeError as e:
        raise HeadshareError(f"{out}: not valid JSON ({e}); cannot resume") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "method" in r and "ratio" in r for r in rows):
        raise HeadshareError(f"{out} is not a benchmark file (expected a list of rows with method and ratio)")
    for r in rows:
        for k in SETTING_KEYS:
            if r.get(k) != settings.get(k):
                raise HeadshareError(f"{out} holds rows made with {k}={r.get(k)!r}, this run has {k}={settings[k]!r}; "
                                 "use another --json file or --force")
    return rows


def write_rows(out: Path, rows: list[dict]) -> None:
    """Atomic: a crash while writing leaves the previous file intact."""
    atomic_write_text(out, json.dumps(rows, indent=1) + "\n")


# -- reports ------------------------------------------------------------------------------------------------

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


PRUNING = ("prune", "fitprune", "actshare-as-prune")  # rows that remove units without sharing anything


def is_pruning(method: str) -> bool:
    """Whether a row's method only prunes (whatever its unit kind)."""
    return split_method(method)[0] in PRUNING


def budget_groups(rows: list[dict], tolerance: float = 0.02) -> list[list[dict]]:
    """The rows (original left out) in groups that remove the same parameters, smallest first: within
    `tolerance` of the group's smallest. Ratios alone do not say it: 40 % of SmolLM2's query-head units
    remove what 30 % of its key/value units do, and a basis spends its budget to within a few rows
    (choiceshare, whose ranks come from a grid, to within 1.3 %: Gemma 3 270M at 10 %)."""
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


def sharing_gap(rows: list[dict]) -> list[dict]:
    """Per budget (`budget_groups`): the best row that shares against the best that only prunes.

    `gap` is best sharing perplexity / best pruning perplexity - 1: negative means sharing wins."""
    out = []
    for here in budget_groups(rows):
        share = min((r for r in here if not is_pruning(r["method"])), key=lambda r: r["perplexity"], default=None)
        prune = min((r for r in here if is_pruning(r["method"])), key=lambda r: r["perplexity"], default=None)
        if share and prune:
            out.append({"ratio": group_ratio(here), "sharing": share["method"], "sharing_ppl": share["perplexity"],
                        "pruning": prune["method"], "pruning_ppl": prune["perplexity"],
                        "gap": share["perplexity"] / prune["perplexity"] - 1,
                        "model_fraction": share["params_removed"] / share["params_total"]})
    return out


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
        ax.set_title(title or f"{r['model']}: perplexity on {r['tokens']:,} tokens of {r['text']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(methods) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the whole run -------------------------------------------------------------------------------------

def run_bench(model: str = "smollm2-135m", ratios=DEFAULT_RATIOS, methods=DEFAULT_METHODS,
              out: str | Path = "bench.json", *, text: str = "builtin", calib: str = "builtin:calib",
              calib_tokens: int | None = None, max_tokens: int | None = None, window: int = 512, seed: int = 0,
              options: dict | None = None, resume: bool = False, force: bool = False, md: str | Path | None = None,
              plot: str | Path | None = None, run_probe: bool = True, progress: bool = True,
              device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              offload: bool = False) -> list[dict]:
    """Measure every (method, ratio) and append the rows to the JSON list `out`; returns all rows.

    Args:
        model: alias, local directory or hub id of the original model.
        text / calib: evaluation and calibration text sources (see `headshare.data.load_text`).
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

    from .data import load_text
    from .fetch import load_model

    methods = resolve_methods(methods)
    ratios = list(dict.fromkeys(_ratio_key(r) for r in ratios))
    for r in ratios:
        if not 0 <= r < 1:
            raise HeadshareError(f"ratio must be in [0, 1), got {r}")
    # rows made before dtypes were a setting were all float32 and hold no dtype: None keeps them resumable
    settings = {"model": model, "text": text, "calib": calib, "calib_tokens": calib_tokens,
                "max_tokens": max_tokens, "window": window, "seed": seed, "options": options or None,
                "dtype": None if dtype in (None, torch.float32) else str(dtype).removeprefix("torch.")}
    for m in methods:
        for r in ratios:
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
        eval_text = load_text(text, split="eval")
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


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m headshare.bench", description="benchmark helpers")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="load a checkpoint and print its memory and speed as JSON")
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = probe_checkpoint(args.path, args.prefill_tokens, args.decode_tokens, args.repeats, args.prompt_tokens,
                              args.dtype)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
