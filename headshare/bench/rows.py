"""The benchmark's JSON file: rows read back for --resume (only if made with the same settings), written
atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HeadshareError
from ..files import atomic_write_text
from .settings import SETTING_KEYS


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
