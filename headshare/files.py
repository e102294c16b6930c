"""Files: output-directory checks, atomic writes and safetensors reads with one-line errors.

Every command writes into a temporary sibling and renames it into place, so a failure leaves either
the previous state or the finished result, never half of it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import HeadshareError

_MADV_DONTNEED = 4  # Linux's value


def check_output(out: str | Path, model_dir: str | Path | None = None, force: bool = False) -> Path:
    """Refuse an output directory that would clobber something: inside the input model, an existing
    file, or a non-empty directory without `force`. Returns the resolved path."""
    out = Path(out).resolve()
    if model_dir is not None:
        src = Path(model_dir).resolve()
        if out == src or src in out.parents:
            raise HeadshareError(f"output {out} is inside the input model directory {src}; choose another place")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force, or force=True, to replace it)")
    return out


@contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out` to write into; on success it replaces `out`.

    An existing non-empty `out` is refused unless `force`; on any error the temporary directory is
    removed and `out` is left as it was.
    """
    out = check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def safetensors_error(file: Path, e: Exception) -> HeadshareError:
    """The one-line refusal of a damaged safetensors file, from the library's error `e`."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return HeadshareError(f"{file}: not a readable safetensors file (corrupt or truncated: {first})")


def read_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a corrupt or truncated file gives a HeadshareError naming it."""
    from safetensors.torch import load_file

    file = Path(file)
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error type (and OSError) for damaged files
        raise safetensors_error(file, e) from None


def safetensors_shapes(file: str | Path) -> dict[str, tuple[list[int], str]]:
    """{key: (shape, dtype name)} from a safetensors header, without reading the tensors."""
    from safetensors import safe_open

    file = Path(file)
    try:
        with safe_open(file, framework="pt") as sf:
            out = {}
            for k in sf.keys():
                sl = sf.get_slice(k)
                out[k] = (list(sl.get_shape()), sl.get_dtype())
    except Exception as e:  # a cut-short file fails here too: safetensors checks the header covers the file
        raise safetensors_error(file, e) from None
    return out


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's memory mappings of files (Linux: /proc/self/maps)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[3] != "00:00" and parts[5].startswith("/"):
                    lo, hi = parts[0].split("-")
                    spans.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return spans


def release_mapped(tensors: Iterable[torch.Tensor]) -> int:
    """Take out of resident memory the pages of CPU `tensors` that lie inside a file mapping (weights
    that safetensors memory-mapped on load), returning the bytes released. For weights about to be dropped:
    their own storage is a view of the mapped file, so dropping the tensors frees nothing, and the pages
    read (or copied on write) stay resident as long as the file stays mapped for the other weights. A
    released page is read from the file again if touched, with the file's contents: only for tensors nothing
    will read. Linux only (elsewhere, and for memory not mapped from a file, it does nothing)."""
    if not sys.platform.startswith("linux"):
        return 0
    spans = _file_mappings()
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    done = 0
    for t in tensors:
        if t.device.type != "cpu" or not t.numel():
            continue
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        if not any(a <= lo and hi <= b for a, b in spans):
            continue
        lo, hi = -(-lo // page) * page, hi // page * page  # whole pages inside the tensor only
        if hi > lo and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
            done += hi - lo
    return done
