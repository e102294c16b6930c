"""Where a command runs and in what precision: `--device`, `--dtype`, `--offload` turned into torch objects.

The command line decides all of it before a model loads, so that a bad choice (a GPU the machine
does not have, a dtype the device cannot compute in, a model larger than the GPU) costs nothing and
ends in one line that says what to do. The Python API does not use this module: it keeps following the
device and dtype of the model it is given.

    >>> device = resolve_device("auto")            # cuda:0 when torch sees a GPU, else cpu
    >>> dtype = resolve_dtype("auto", device)      # bfloat16 on a GPU that has it, float32 on a CPU
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import HeadshareError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

# Memory kept free beside the weights for what running the model needs on top of them (activations,
# logits of a window over the vocabulary, calibration statistics): a tenth of the weights, at least 2 GiB.
# A guess on the safe side: without --offload a model that does not fit is refused, not tried.
ACTIVATION_SHARE = 0.1
ACTIVATION_MIN_BYTES = 2 << 30

# safetensors dtype names of tensors that loading does not cast (only floating-point tensors take --dtype)
_FIXED_BYTES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def resolve_device(text: str | None) -> torch.device:
    """The device a command runs on: "auto" (or None) is cuda:0 when torch sees a GPU, else the CPU;
    "cpu", "cuda" (= cuda:0) and "cuda:N" name one. Anything else, a GPU this machine lacks, or an
    index past its GPUs is a ValueError that says what to use instead."""
    name = "auto" if text is None else text.strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise HeadshareError(f"unknown --device {text!r}; use auto, cpu, cuda or cuda:N (N a GPU index)")
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no GPU on this machine"
        raise HeadshareError(f"--device {text}: {why}; use --device cpu (or auto)")
    n, count = int(index or 0), torch.cuda.device_count()
    if n >= count:
        raise HeadshareError(f"--device {text}: this machine has {count} GPU{'s' if count > 1 else ''} "
                         f"(cuda:0 to cuda:{count - 1}); choose one of them")
    return torch.device("cuda", n)


def _bf16_native() -> bool:
    """Whether the current GPU computes in bfloat16 natively; torch < 2.3 cannot tell emulation apart."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()


@functools.cache
def computes_in(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch on `device` runs what a model's forward needs (a linear layer, softmax attention,
    a normalisation) in `dtype`.

    Tried, not looked up: CPU kernels for half precision arrived in different torch releases (float16
    matmul on the CPU is missing from older ones), and a trial answers for the torch actually installed.
    """
    if dtype == torch.float32:
        return True
    if device.type == "cuda" and dtype == torch.bfloat16:
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported()
    try:
        x = torch.ones(2, 4, 8, 8, dtype=dtype, device=device)
        w = torch.ones(8, 8, dtype=dtype, device=device)
        y = torch.nn.functional.linear(x, w)
        y = torch.nn.functional.scaled_dot_product_attention(y, y, y, is_causal=True)
        torch.nn.functional.layer_norm(y.softmax(-1), (8,))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def resolve_dtype(text: str | None, device: torch.device) -> torch.dtype:
    """The dtype the model's weights are loaded in and computed in on `device`.

    "auto" (or None): bfloat16 on a GPU that computes in it natively, float32 on older GPUs (float16
    would overflow on models trained in bfloat16) and on the CPU, where float32 is the fast one unless the
    CPU has AMX (there bf16 halves the memory and computes about 5x faster: `--dtype bfloat16`).
    float32, bfloat16, float16 (or fp32, bf16, fp16) name one; an unknown name, or a dtype the device
    cannot compute in, is a ValueError that says what to use instead.
    """
    name = "auto" if text is None else text.strip().lower()
    if name == "auto":
        if device.type == "cuda":
            with torch.cuda.device(device):
                return torch.bfloat16 if _bf16_native() else torch.float32
        return torch.float32
    if name not in DTYPES:
        raise HeadshareError(f"unknown --dtype {text!r}; use auto, float32, bfloat16 or float16")
    dtype = DTYPES[name]
    if not computes_in(device, dtype):
        raise HeadshareError(f"--dtype {text}: torch {torch.__version__} cannot compute in {_name(dtype)} on {device}; "
                         "use --dtype float32 (or auto)")
    return dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Placement:
    """Where a command's model computes (`device`), in what (`dtype`), and whether its weights stay in
    CPU memory while the device runs one block at a time (`offload`)."""

    device: torch.device
    dtype: torch.dtype
    offload: bool = False

    @property
    def load_device(self) -> torch.device:
        """Where the weights are loaded: the device itself, or the CPU when they are offloaded."""
        return torch.device("cpu") if self.offload else self.device


def placement(device: str | None, dtype: str | None, offload: bool = False) -> Placement:
    """`resolve_device` and `resolve_dtype` together; with `offload` the dtype must also run on the CPU,
    where the weights stay (and where evaluation of an offloaded model runs)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if offload and dev.type != "cpu" and not computes_in(torch.device("cpu"), dt):
        raise HeadshareError(f"--offload keeps the weights on the CPU, where torch {torch.__version__} cannot compute in "
                         f"{_name(dt)}; use --dtype float32")
    return Placement(dev, dt, offload)


# -- does it fit --------------------------------------------------------------------------------------

def weight_bytes(path: str | Path, dtype: torch.dtype) -> int:
    """Bytes the weights of the model directory `path` take once loaded in `dtype`, without loading it.

    Read from the safetensors headers (floating-point tensors counted at `dtype`'s size, others as stored);
    a directory without safetensors is counted by building its model on the meta device from config.json.
    """
    from .files import safetensors_shapes

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    size = torch.finfo(dtype).bits // 8
    if files:
        total = 0
        for f in files:
            for shape, kind in safetensors_shapes(f).values():
                n = 1
                for s in shape:
                    n *= s
                total += n * _FIXED_BYTES.get(kind, size)
        return total
    return _meta_bytes(path, size)


def _meta_bytes(path: Path, size: int) -> int:
    """Weight bytes of a model built on the meta device (no memory) from its config: for .bin checkpoints."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    auto = AutoModel if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) \
        else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return _tensor_bytes(model.parameters(), size) + _tensor_bytes(model.buffers(), size)


def _tensor_bytes(tensors: Iterable[torch.Tensor], size: int) -> int:
    seen: dict[int, int] = {}  # tied tensors (embeddings) once
    for t in tensors:
        seen[id(t)] = t.numel() * (size if t.is_floating_point() else t.element_size())
    return sum(seen.values())


def free_bytes(device: torch.device) -> int:
    """Memory free on a GPU now (other processes' use counted), from the driver."""
    free, _ = torch.cuda.mem_get_info(device)
    return free


def check_fits(weights: int, device: torch.device, *, what: str = "the model",
               hint: str = "add --offload") -> None:
    """Refuse, with a ValueError that ends in `hint`, when `weights` bytes plus room for running the model
    (`ACTIVATION_SHARE` of them, at least `ACTIVATION_MIN_BYTES`) exceed the memory free on the GPU `device`.
    The CPU is not checked: the operating system pages, and a CPU run that is too large fails on its own."""
    if device.type != "cuda":
        return
    margin = max(ACTIVATION_MIN_BYTES, int(ACTIVATION_SHARE * weights))
    free = free_bytes(device)
    if weights + margin > free:
        raise HeadshareError(f"{what} does not fit on {device} ({_gb(weights)} GB of weights + {_gb(margin)} GB for "
                         f"activations, {_gb(free)} GB free): {hint}")


# -- offloaded evaluation ----------------------------------------------------------------------------------

def _offload_map(model: nn.Module) -> dict[str, str]:
    """accelerate device map that offloads every transformer block as one unit, and every module outside the
    blocks (embeddings, final norm, head) as another, so a block's weights travel together."""
    from .arch import blocks

    names = {id(m): n for n, m in model.named_modules()}
    block_names = {names[id(b)] for b in blocks(model)}
    device_map: dict[str, str] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full in block_names or not any(b.startswith(full + ".") for b in block_names):
                device_map[full] = "cpu"
            else:  # holds blocks: go down to them
                walk(child, full + ".")

    walk(model, "")
    return device_map


def offload(model: nn.Module, device: torch.device) -> nn.Module:
    """Keep `model`'s weights in CPU memory, in their dtype, and run each block on `device` in its turn
    (accelerate's hooks copy a block's weights in before it runs and drop the copy after). Returns the model.

    Only for unshared models: a shared layer reads weights another block owns, which the hooks have
    not brought to the device at that moment (its output is silently wrong), so shared models are refused.
    """
    from accelerate import dispatch_model

    from .arch import blocks
    from .units import is_shared

    if is_shared(model):
        raise HeadshareError("--offload cannot run a shared model (its layers read weights of other layers); "
                         "drop --offload and use a device it fits on, or --device cpu")
    # force_hooks: with every module mapped to "cpu" accelerate would otherwise just move the model there;
    # preloading the block classes moves a block's weights in one go when it starts, not layer by layer.
    # main_device is given as a torch.device (not "cpu"): accelerate then offloads even when it is the CPU,
    # so the CPU runs the same path a GPU does (what the tests check)
    preload = sorted({type(b).__name__ for b in blocks(model)})
    return dispatch_model(model, _offload_map(model), main_device=torch.device(device), force_hooks=True,
                          preload_module_classes=preload)


def execution_device(model: nn.Module) -> torch.device:
    """Where `model` computes: the execution device of an offloaded model (its parameters then sit on the
    meta device between calls), else the device of its first parameter."""
    hook = getattr(model, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device
