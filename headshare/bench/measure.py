"""One row: plan, share and measure one (method, ratio) on a copy of the model."""

from __future__ import annotations

import copy
import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..arch import arch_spec, blocks, layout_of
from ..methods import make_plan
from ..plan import SharePlan
from ..sharing import share, unique_parameters
from ..structure import BASIS_NAME
from .alternatives import is_alternative, remove_whole
from .probe import PROBE_KEYS, probe
from .settings import bench_config

# what a row keeps of each evaluation text
TEXT_KEYS = ("perplexity", "reference_perplexity", "kl", "top1_agreement", "nll", "tokens")


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


def _calibration(model: nn.Module, tokenizer, settings: dict) -> torch.Tensor:
    """The calibration blocks the data-aware methods read, for the whole-model alternatives."""
    from ..methods import CalibConfig
    from ..methods.calibration import calibration_ids

    defaults = CalibConfig.defaults()
    return calibration_ids(model, tokenizer, settings.get("calib") or defaults["calib"],
                           settings.get("calib_tokens") or defaults["calib_tokens"])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(method: str, ratio: float, original: nn.Module, reference: nn.Module, tokenizer,
            text: str | dict[str, str], settings: dict, run_probe: bool = True, progress: bool = True,
            make: Callable[[nn.Module], SharePlan] | None = None, plan_device: torch.device | None = None) -> dict:
    """Plan, share and measure one (method, ratio) on a copy of `original`; returns the row.

    `make`, if given, makes the plan from the copy instead of the registered `method` (for controls that
    are not methods, such as pruning exactly the units another method shares); `method` then only names
    the row. `plan_device`: where calibration computes (None: where the model is; a GPU for a model kept
    on the CPU: offloading). `text`: the evaluation text, or {source name: text} for several, the first of
    which gives the row's own perplexity, KL and top-1; every one is in the row's "texts"."""
    from ..evaluate import compare

    params0, _ = unique_parameters(original)
    attn0 = attention_params(original)
    t0 = time.perf_counter()
    removed = None
    if ratio == 0:
        model, plan = original, None  # nothing to share: measure the model as it is
    elif is_alternative(method) and make is None:
        model, plan = copy.deepcopy(original), None
        removed = remove_whole(model, method, ratio, _calibration(original, tokenizer, settings), plan_device)
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
    texts = text if isinstance(text, dict) else {str(settings.get("text")): text}
    evals = {}
    for name, body in texts.items():
        # ratio 0 compares the original with itself: its windows then run once, the second pass is replayed
        evals[name] = compare(reference if model is original else model, reference, tokenizer, body,
                              window=settings["window"], stride=settings["window"], max_tokens=settings["max_tokens"],
                              progress=progress)
    ev = next(iter(evals.values()))
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
        "texts": {name: {k: e[k] for k in TEXT_KEYS} for name, e in evals.items()},
        "attn_params_total": attn0, "attn_params_removed": attn0 - attn,
        "params_total": params0, "params_removed": params0 - params,
        "weight_bytes": nbytes, "checkpoint_bytes": ckpt_bytes,
        **{k: speed.get(k) for k in PROBE_KEYS},
        "config": plan.config if plan else None,
        **({"removed": removed} if removed is not None else {}),
        # autoshare: the candidate kept and every candidate's held-out calibration loss
        **({k: plan.notes[k] for k in ("chosen", "candidates")} if plan and "chosen" in plan.notes else {}),
        "plan_s": plan_s, "eval_s": sum(e["seconds"] for e in evals.values()), "torch_threads": torch.get_num_threads(),
        "device": str(plan_device or next(original.parameters()).device),  # where planning computed
        "loadavg_1min": round(os.getloadavg()[0], 2),  # these machines are shared: say how busy this one was
        **settings,
    }
