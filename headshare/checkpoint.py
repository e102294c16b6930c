"""Saving and loading shared models as ordinary transformers checkpoints.

The saved directory is config.json + safetensors, whose config carries the plan under "headshare" and
an `auto_map` pointing at a two-line `headshare_modeling.py`, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and `headshare.load(dir)` both
rebuild the shared structure before reading the weights. The stored plan is validated on load: an
edited one (a source in a later layer, a unit out of range, a scale that is not finite) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .arch import layout_of
from .config import is_integer
from .errors import HeadshareError
from .files import atomic_dir, read_safetensors, safetensors_shapes
from .plan import CHECKPOINT_KEYS, SharePlan
from .structure import STORAGE, SharedProjection, apply_structure
from .units import is_unit_key, parse_fitted_key

MODELING_FILE = "headshare_modeling.py"

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
    with atomic_dir(save_directory, force=force) as tmp:
        super(model.__class__, model).save_pretrained(tmp, *args, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(
            '"""Loads a headshare checkpoint with transformers (trust_remote_code=True); needs `pip install '
            'headshare`."""\n'
            f"from transformers import {base.__name__}\n\n"
            "from headshare.checkpoint import shared_model_class\n\n"
            f"{model.__class__.__name__} = shared_model_class({base.__name__})\n"
        )


def read_record(path: str | Path) -> dict:
    """The "headshare" section of a saved model's config.json (a clear error if it is not one)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a model directory")
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise HeadshareError(f"{cfg}: corrupt JSON ({e})") from None
    if not isinstance(d, dict) or "headshare" not in d:
        raise HeadshareError(f"{path} is not a headshare checkpoint (config.json has no 'headshare' section)")
    record = d["headshare"]
    bad = _record_problem(record)
    if bad:
        raise HeadshareError(f"{path}: the plan stored in config.json is invalid: {bad}")
    return record


def _record_problem(record) -> str | None:
    """What is wrong with the keys a checkpoint stores beside its plan (None: nothing)."""
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    if not isinstance(record.get("base_class"), str):
        return f"'base_class' must be a class name, got {record.get('base_class')!r}"
    for key in CHECKPOINT_KEYS[1:]:
        v = record.get(key, 0)
        if key in ("params_original", "bytes_original") and key not in record:
            return f"missing {key!r}"
        if not (is_integer(v) and v >= 0):
            return f"{key!r} must be a non-negative integer, got {v!r}"
    return None


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
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    record = read_record(path)
    config = AutoConfig.from_pretrained(path)
    base = _base_class(path, record)
    if dtype == "auto":
        dtype = None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # parameters on the meta device (buffers such as RoPE's made as usual), and assign=True below swaps in
    # the loaded tensors instead of copying: the full-size model is never allocated, only the checkpoint read.
    # (Empty CPU parameters, as before, were freed at the swap, and freeing them raised glibc's mmap
    # threshold to the size of an MLP weight: the activations of the first prefill then stayed on the heap,
    # and the shared SmolLM2 peaked 5 MB above the original instead of 30 MB below it.)
    with init_empty_weights(include_buffers=False):
        model = base(config)
    plan = stored_plan(path, record, config)
    apply_structure(model, plan, layout_of(config, plan.unit_kind), copy_weights=False)
    older = _older_storage(model, record)
    check_weight_shapes(path, model, missing=False, older=older)  # (tied tensors are tied after loading; below)
    model.__class__ = shared_model_class(base)
    state = {}
    for f in _state_dict_files(path):
        state.update(read_safetensors(f))
    for key in older & set(state):  # a checkpoint from before input-major o weights: same numbers, transposed
        state[key] = state[key].T.contiguous()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()  # tied embeddings are stored once, under the input embedding's key
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise HeadshareError(f"{path}: the weights do not match the structure of the plan stored in config.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
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
        if not v.is_meta:  # a tensor never loaded is missing, not tied (every meta tensor has data_ptr 0)
            by_ptr.setdefault(v.data_ptr(), []).append(k)
    return {k for keys in by_ptr.values() if len(keys) > 1 for k in keys}


def stored_plan(path: Path, record: dict, config) -> SharePlan:
    """The plan stored in a checkpoint's config, every field checked and then checked against the layout of
    `config` (the model's transformers config): an edited or damaged one is refused in one line."""
    try:
        plan = SharePlan.from_dict(record)
        plan.fitted_names = []  # applied before saving: the weights hold them
        plan.validate(layout_of(config, plan.unit_kind))
    except HeadshareError as e:
        raise HeadshareError(f"{path}: the plan stored in config.json is invalid: {e}") from None
    return plan


def _older_storage(model: nn.Module, record: dict) -> set[str]:
    """State-dict keys whose tensors a checkpoint of an older `structure.STORAGE` stores transposed from what
    `model`'s structure holds (version 1: every o projection as the original weight, (out, in))."""
    if record.get("storage", 1) >= STORAGE:
        return set()
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, SharedProjection) and m.weight is not None and m.input_major}


def check_weight_shapes(path: Path, model: nn.Module, missing: bool = True, older: set[str] = frozenset()) -> None:
    """Refuse a checkpoint whose stored tensors are not the ones the stored plan's structure gives `model` (an
    edited plan, or weights of another plan): a tensor of another shape, one the structure lacks, and with
    `missing` one it needs (tied tensors are stored once). Reads the safetensors headers alone. `older`: keys
    stored transposed (`_older_storage`)."""
    params = model.state_dict(keep_vars=True)
    by_id: dict[int, list[str]] = {}
    for k, v in params.items():
        by_id.setdefault(id(v), []).append(k)
    have = {}
    for f in _state_dict_files(path):
        have.update({k: (tuple(shape)[::-1] if k in older else tuple(shape), f.name)
                     for k, (shape, _) in safetensors_shapes(f).items()})
    problem = None
    for key, (shape, file) in have.items():
        if key not in params:
            problem = f"the weights in {file} hold {key}, which its structure does not have"
        elif shape != tuple(params[key].shape):
            problem = f"it gives {key} the shape {tuple(params[key].shape)}, the weights in {file} have {shape}"
        if problem:
            break
    if problem is None and missing:
        lacking = [k for k in params if k not in have and not any(t in have for t in by_id[id(params[k])])]
        if lacking:
            problem = f"its structure needs {lacking[0]}, which the weights do not hold"
    if problem:
        raise HeadshareError(f"{path}: the plan stored in config.json is invalid: {problem}")


def _base_class(path: Path, record: dict) -> type:
    """The transformers class the stored record names as the shared model's base."""
    import transformers

    base = getattr(transformers, record["base_class"], None)
    if base is None:
        raise HeadshareError(f"{path}: transformers has no class {record['base_class']!r}; upgrade transformers")
    return base


def _meta_structure(path: Path, record: dict, config, plan: SharePlan) -> nn.Module:
    """The shared model's structure on the meta device (no memory), to check the weights' shapes against."""
    base = _base_class(path, record)
    with torch.device("meta"):
        model = base(config)
    apply_structure(model, plan, layout_of(config, plan.unit_kind), copy_weights=False)
    model.tie_weights()  # tied embeddings are stored once
    return model


def info(path: str | Path) -> dict:
    """What a saved shared checkpoint holds: the plan's counts and the parameters and bytes saved."""
    from transformers import AutoConfig

    path = Path(path)
    record = read_record(path)
    config = AutoConfig.from_pretrained(path)
    plan = stored_plan(path, record, config)
    meta = _meta_structure(path, record, config, plan)
    check_weight_shapes(path, meta, older=_older_storage(meta, record))
    params = 0
    nbytes = 0
    for f in _state_dict_files(path):
        for shape, dtype in safetensors_shapes(f).values():
            n = 1
            for s in shape:
                n *= s
            params += n
            nbytes += n * _DTYPE_BYTES[dtype]
    layout = record["layout"]
    units_total = layout["num_layers"] * layout["units_per_layer"]
    return {
        "method": plan.method,
        "chosen": plan.notes.get("chosen"),  # autoshare: the candidate it kept
        "why": plan.notes.get("why"),  # autoshare: why, in one sentence (unit kind and margins)
        "candidates": plan.notes.get("candidates", []),  # autoshare: every candidate's held-out losses
        "val_text": plan.notes.get("val_text"),  # autoshare: the text it chose on
        "ratio": plan.ratio,
        "unit": plan.unit,
        "unit_kind": plan.unit_kind,
        "units_total": units_total,
        "units_shared": len(plan.assignments),
        "units_pruned": len(plan.pruned),
        "units_based": plan.units_based(layout["units_per_layer"]),
        "bases": len(plan.bases),
        "basis_ranks": [b["rank"] for b in plan.bases],
        "based_rows": plan.based_rows(layout_of(config, plan.unit_kind)),
        "units_refitted": len({(layer, unit) for layer, _, unit in
                               map(parse_fitted_key, filter(is_unit_key, record.get("fitted", [])))}),
        "params_original": record["params_original"],
        "params_shared": params,
        "bytes_original": record["bytes_original"],
        "bytes_shared": nbytes,
        "checkpoint_bytes": sum(f.stat().st_size for f in _state_dict_files(path)),
    }


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
