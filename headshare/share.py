"""Applying a plan: projections whose unit slices live in another layer, and saving/loading the result.

`share(model, plan)` replaces every attention projection named by the architecture mapping with a
`SharedProjection`. Each one stores only the slices of the units its layer still owns, in the same
orientation as the original weight and under the same state-dict key (`...q_proj.weight`, now with
fewer rows). A borrowed unit holds a reference to the projection that owns its root unit and slices
that weight at run time: the slice is a view, so nothing is copied and one tensor serves both
layers, in memory, in gradients and on disk.

The saved directory is an ordinary transformers checkpoint (config.json + safetensors) whose
config carries the plan under "headshare" and an `auto_map` pointing at a two-line
`headshare_modeling.py`, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
and `headshare.load(dir)` both rebuild the shared structure before reading the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Layout, ProjSpec, blocks, layout_of
from .plan import SharePlan

_MODELING_FILE = "headshare_modeling.py"
# from this many tokens in a call, a shared projection gathers its weight and runs one product; below it
# (decoding), a product per run reads the weights once without the copy
GATHER_MIN_TOKENS = 16


class SharedProjection(nn.Module):
    """A Linear/Conv1D whose per-unit slices are either its own, borrowed from another layer, or pruned."""

    def __init__(self, proj: ProjSpec, units: int, own: list[int], weight: torch.Tensor | None,
                 bias: torch.Tensor | None, out_features: int, in_features: int):
        super().__init__()
        self.proj, self.units, self.own = proj, units, list(own)
        self.out_features, self.in_features = out_features, in_features
        self.weight = nn.Parameter(weight) if weight is not None else None
        self.bias = nn.Parameter(bias) if bias is not None else None
        # (module, start, stop, scale) runs in feature order; module None means zeros (a pruned unit)
        self._segments: list[tuple[SharedProjection | None, int, int, float]] = []

    # Storage layout: own units in increasing order, part by part (q of all own units, then k, ...).
    def own_range(self, unit: int, part: int) -> tuple[int, int]:
        k = self.own.index(unit)
        width = self.proj.parts[part][2]
        start = sum(w for _, _, w in self.proj.parts[:part]) * len(self.own) + k * width
        return start, start + width

    def link(self, sources: dict[int, tuple[SharedProjection, int] | None], scales: dict[int, float]) -> None:
        """Lay out the feature runs. `sources[u]` is (owner, unit) for a borrowed unit, None if pruned."""
        runs: list[tuple[SharedProjection | None, int, int, float]] = []
        for p, (_, _, width) in enumerate(self.proj.parts):
            for u in range(self.units):
                if u not in sources:
                    owner, unit, scale = self, u, 1.0
                elif sources[u] is None:
                    owner, unit, scale = None, u, 0.0
                else:
                    (owner, unit), scale = sources[u], (scales.get(u, 1.0) if self.proj.role == "in" else 1.0)
                start, stop = owner.own_range(unit, p) if owner is not None else (0, width)
                prev = runs[-1] if runs else None
                if prev and prev[0] is owner and prev[3] == scale and (owner is None or prev[2] == start):
                    runs[-1] = (owner, prev[1], prev[2] + width if owner is None else stop, scale)
                else:
                    runs.append((owner, start, stop, scale))
        # a plain list attribute keeps other layers' modules out of this module's children and state dict
        self.__dict__["_segments"] = runs

    def _w(self, owner: SharedProjection, start: int, stop: int) -> torch.Tensor:
        dim = self.proj.weight_dim()
        return owner.weight.narrow(dim, start, stop - start)

    def _project(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.proj.conv1d:  # (in, out) weight
            y = x @ w
            return y + b if b is not None else y
        return F.linear(x, w, b)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's full weight (and bias) assembled from the runs: a temporary copy."""
        dim, ws, bs = self.proj.weight_dim(), [], []
        owners = [o for o, *_ in self._segments if o is not None]
        ref = owners[0].weight
        out_bias = self.proj.role == "out" and any(o.bias is not None for o in owners)
        for owner, a, b, scale in self._segments:
            if owner is None:
                shape = list(ref.shape)
                shape[dim] = b - a
                ws.append(ref.new_zeros(shape))
            else:
                w = self._w(owner, a, b)
                ws.append(w * scale if scale != 1.0 else w)
            if out_bias:
                bs.append(owner.bias[a:b] if owner is not None else ref.new_zeros(b - a))
        bias = torch.cat(bs) if out_bias else (self.bias if self.proj.role == "in" else None)
        return torch.cat(ws, dim=dim), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segs = self._segments
        if len(segs) > 1 and x.numel() >= GATHER_MIN_TOKENS * x.shape[-1] and any(o is not None for o, *_ in segs):
            # many tokens: one matrix product over a gathered weight beats a product per run (and, for
            # o, partial sums over strided input slices); the copy is freed right after
            w, b = self._gathered()
            return self._project(x, w, b)
        if self.proj.role == "out":
            outs = []
            for owner, a, b, _ in segs:
                if owner is None:
                    outs.append(x.new_zeros(*x.shape[:-1], b - a))
                else:
                    bias = owner.bias[a:b] if owner.bias is not None else None
                    outs.append(self._project(x, self._w(owner, a, b), bias))
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        # role "in": the output is a sum over the input feature runs of each unit
        y = None
        pos = 0
        for owner, a, b, scale in segs:
            n = b - a
            if owner is not None:
                xs = x if n == x.shape[-1] else x[..., pos:pos + n]
                part = self._project(xs, self._w(owner, a, b), None)
                if scale != 1.0:
                    part = part * scale
                y = part if y is None else y + part
            pos += n
        if y is None:
            y = x.new_zeros(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"{self.proj.path}, role={self.proj.role}, units={self.units}, own={len(self.own)}, "
                f"runs={len(self._segments)}")


def _project_weight(proj: ProjSpec, module: nn.Module, own: list[int]) -> tuple[torch.Tensor | None, ...]:
    """The own-unit slices of a projection's weight (and bias), in SharedProjection's storage layout."""
    if not own:
        return None, (module.bias.detach().clone() if proj.role == "in" and module.bias is not None else None)
    idx = torch.cat([torch.cat([torch.arange(off + u * w, off + (u + 1) * w) for u in own])
                     for _, off, w in proj.parts])
    dim = proj.weight_dim()
    weight = module.weight.detach().index_select(dim, idx.to(module.weight.device)).contiguous()
    bias = None
    if module.bias is not None:
        bias = module.bias.detach().clone() if proj.role == "in" else module.bias.detach()[idx].contiguous()
    return weight, bias


def _empty_weight(proj: ProjSpec, module: nn.Module, own: list[int]) -> tuple[torch.Tensor | None, ...]:
    """Uninitialised tensors of the shapes `_project_weight` would give, for a model about to be loaded."""
    w, b = module.weight, module.bias
    weight = None
    if own:
        shape = list(w.shape)
        shape[proj.weight_dim()] = proj.unit_width * len(own)
        weight = torch.empty(shape, dtype=w.dtype, device=w.device)
    if b is not None and (own or proj.role == "in"):
        b = torch.empty(b.shape[0] if proj.role == "in" else proj.unit_width * len(own), dtype=b.dtype)
    else:
        b = None
    return weight, b


def _features(proj: ProjSpec, module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if proj.conv1d else (w.shape[0], w.shape[1])


def _apply_structure(model: nn.Module, plan: SharePlan, layout: Layout, copy_weights: bool = True) -> None:
    roots = plan.roots()
    scales = {(a.layer, a.unit): a.scale for a in plan.assignments}
    pruned = {tuple(p) for p in plan.pruned}
    U = layout.units_per_layer
    new: dict[tuple[int, str], SharedProjection] = {}
    for layer, block in enumerate(blocks(model)):
        gone = {u for u in range(U) if (layer, u) in roots or (layer, u) in pruned}
        own = [u for u in range(U) if u not in gone]
        for proj in layout.projections():
            old = block.get_submodule(proj.path)
            if isinstance(old, SharedProjection):
                raise ValueError("this model is already shared; load the original model to apply another plan")
            weight, bias = _project_weight(proj, old, own) if copy_weights else _empty_weight(proj, old, own)
            out_f, in_f = _features(proj, old)
            new[(layer, proj.path)] = SharedProjection(proj, U, own, weight, bias, out_f, in_f)
    for (layer, path), mod in new.items():
        sources = {}
        for u in range(U):
            if (layer, u) in pruned:
                sources[u] = None
            elif (layer, u) in roots:
                rl, ru = roots[(layer, u)]
                sources[u] = (new[(rl, path)], ru)
        mod.link(sources, {u: scales[(layer, u)] for u in range(U) if (layer, u) in scales})
        parent_path, _, name = path.rpartition(".")
        parent = blocks(model)[layer].get_submodule(parent_path) if parent_path else blocks(model)[layer]
        setattr(parent, name, mod)


def unique_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) counting every storage once, so tied and shared weights count once."""
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        seen[key] = (p.numel(), p.numel() * p.element_size())
    return sum(n for n, _ in seen.values()), sum(b for _, b in seen.values())


def share(model: nn.Module, plan: SharePlan) -> nn.Module:
    """Apply `plan` to `model` in place and return it; memory drops by the shared units' weights.

    >>> plan = headshare.plan(model, ratio=0.3)   # doctest: +SKIP
    >>> headshare.share(model, plan)              # doctest: +SKIP
    >>> model.save_pretrained("out")              # doctest: +SKIP
    """
    layout = layout_of(model.config)
    plan.validate(layout)
    if plan.notes.get("requires_weights"):  # fitted together with weights (headshare.calibrated)
        from .calibrated import verify_fitted_weights

        verify_fitted_weights(model, plan)
    params0, bytes0 = unique_parameters(model)
    _apply_structure(model, plan, layout)
    params1, bytes1 = unique_parameters(model)
    base = type(model)
    model.__class__ = shared_model_class(base)
    # a GGUF-loaded model carries a quantizer marker that blocks save_pretrained; the weights are plain now
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.config.quantization_config = None
    record = plan.to_dict()
    record.update(base_class=base.__name__, params_original=params0, bytes_original=bytes0,
                  params_shared=params1, bytes_shared=bytes1)
    model.config.headshare = record
    model.config.auto_map = {"AutoModelForCausalLM" if _is_causal_lm(base) else "AutoModel":
                             f"{_MODELING_FILE[:-3]}.{model.__class__.__name__}"}
    return model


def _is_causal_lm(cls: type) -> bool:
    return cls.__name__.endswith(("ForCausalLM", "LMHeadModel"))


# -- saving and loading ---------------------------------------------------------------------------------

_CLASSES: dict[type, type] = {}


def shared_model_class(base: type) -> type:
    """A subclass of a transformers model class that saves and loads headshare checkpoints."""
    if base in _CLASSES.values():
        return base
    if base not in _CLASSES:
        def save_pretrained(self, save_directory, *args, **kwargs):
            """Save like transformers does, atomically, with a modeling file for trust_remote_code."""
            _save(self, base, save_directory, *args, **kwargs)

        @classmethod
        def from_pretrained(cls, path, *args, config=None, **kwargs):
            return load(path, dtype=kwargs.get("dtype") or kwargs.get("torch_dtype"))

        @classmethod
        def register_for_auto_class(cls, auto_class="AutoModel"):
            # transformers would copy this package's source next to the weights; the two-line
            # modeling file written by _save is what a checkpoint needs instead
            return None

        _CLASSES[base] = type(f"Headshare{base.__name__}", (base,),
                              {"save_pretrained": save_pretrained, "from_pretrained": from_pretrained,
                               "register_for_auto_class": register_for_auto_class, "_auto_class": None,
                               "__module__": __name__})
    return _CLASSES[base]


def _save(model: nn.Module, base: type, save_directory, *args, force: bool = False, tokenizer=None,
          **kwargs) -> None:
    """save_pretrained for shared models: written to a temporary directory, then renamed into place.

    `force` replaces an existing directory; `tokenizer`, if given, is saved beside the weights.
    """
    out = Path(save_directory).resolve()
    if out.exists() and not force and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty (pass force=True, or --force, to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        super(model.__class__, model).save_pretrained(tmp, *args, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / _MODELING_FILE).write_text(
            '"""Loads a headshare checkpoint with transformers (trust_remote_code=True); needs `pip install '
            'headshare`."""\n'
            f"from transformers import {base.__name__}\n\n"
            "from headshare.share import shared_model_class\n\n"
            f"{model.__class__.__name__} = shared_model_class({base.__name__})\n"
        )
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_record(path: str | Path) -> dict:
    """The "headshare" section of a saved model's config.json (a clear error if it is not one)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a model directory")
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: corrupt JSON ({e})") from None
    if "headshare" not in d:
        raise ValueError(f"{path} is not a headshare checkpoint (config.json has no 'headshare' section)")
    return d["headshare"]


def _state_dict_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    return files


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None):
    """Load a shared checkpoint written by `save_pretrained` after `share`.

    >>> model = headshare.load("out")   # doctest: +SKIP
    """
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    path = Path(path)
    record = read_record(path)
    config = AutoConfig.from_pretrained(path)
    base = getattr(transformers, record["base_class"], None)
    if base is None:
        raise ValueError(f"{path}: transformers has no class {record['base_class']!r}; upgrade transformers")
    if dtype == "auto":
        dtype = None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # no_init_weights leaves parameters as untouched torch.empty pages, and assign=True below swaps in
    # the loaded tensors instead of copying: the full-size model is never resident, only the checkpoint
    with no_init_weights():
        model = base(config)
    plan = SharePlan.from_dict(record)
    _apply_structure(model, plan, layout_of(config), copy_weights=False)
    model.__class__ = shared_model_class(base)
    state = {}
    for f in _state_dict_files(path):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()  # tied embeddings are stored once, under the input embedding's key
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the shared structure (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    _cast(model, dtype)
    if (path / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    model.eval()
    return model.to(device) if device is not None else model


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and saved buffers, as from_pretrained does; buffers that are not saved (RoPE's
    inv_freq) keep the dtype the model built them in: in bf16 they would round the rotary angles."""
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.to(dtype)


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys whose tensor is the same as another key's (tied embeddings)."""
    by_ptr: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    return {k for keys in by_ptr.values() if len(keys) > 1 for k in keys}


def info(path: str | Path) -> dict:
    """What a saved shared checkpoint holds: the plan's counts and the parameters and bytes saved."""
    from safetensors import safe_open

    path = Path(path)
    record = read_record(path)
    params = 0
    nbytes = 0
    for f in _state_dict_files(path):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                params += n
                nbytes += n * _DTYPE_BYTES[sl.get_dtype()]
    layout = record["layout"]
    units_total = layout["num_layers"] * layout["units_per_layer"]
    return {
        "method": record["method"],
        "ratio": record["ratio"],
        "unit": record.get("unit", ""),
        "units_total": units_total,
        "units_shared": len(record["assignments"]),
        "units_pruned": len(record.get("pruned", [])),
        "params_original": record["params_original"],
        "params_shared": params,
        "bytes_original": record["bytes_original"],
        "bytes_shared": nbytes,
        "checkpoint_bytes": sum(f.stat().st_size for f in _state_dict_files(path)),
    }


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
