"""What every config of headshare does the same way: refuse unknown keys, check numbers, parse KEY=VALUE.

A config is a dataclass deriving from `Config`. `from_dict` refuses keys the dataclass does not declare and
a version newer than this headshare; `check` refuses a bad value with one message naming the option and the
value; `parse_value` reads a command-line string by the option's declared type. The command line takes its
defaults from the dataclass fields (`defaults`), so each default is written once, in the dataclass.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, fields

from .errors import HeadshareError


def is_number(x) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_integer(x) -> bool:
    """An int, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def check(cfg, name: str, ok: bool, what: str) -> None:
    """Refuse a config value: `ok` False raises HeadshareError showing the option and its value."""
    if not ok:
        raise HeadshareError(f"{type(cfg).__name__}: {name} must be {what}, got {getattr(cfg, name)!r}")


@dataclass
class Config:
    """Base of every config dataclass: strict `from_dict`, field defaults for the command line."""

    @classmethod
    def from_dict(cls, d: dict, version: int | None = None):
        """The config from a dict; unknown keys are refused with the list of known ones. `version`, when
        given, is this code's config version: a "version" key newer than it is refused, an older one
        dropped."""
        if not isinstance(d, dict):
            raise HeadshareError(f"{cls.__name__}: expected a mapping of options, got {type(d).__name__}")
        d = dict(d)
        if version is not None and "version" not in {f.name for f in fields(cls)}:
            got = d.pop("version", version)
            if not is_integer(got) or got > version:
                raise HeadshareError(f"{cls.__name__}: config version {got!r} is not one this headshare reads "
                                     f"(up to {version})")
        unknown = sorted(set(d) - {f.name for f in fields(cls)}, key=str)
        if unknown:
            raise HeadshareError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; "
                                 f"its options: {', '.join(f.name for f in fields(cls))}")
        return cls(**d)

    @classmethod
    def defaults(cls) -> dict[str, object]:
        """{option: default} of every field that has one."""
        out = {}
        for f in fields(cls):
            if f.default is not MISSING:
                out[f.name] = f.default
            elif f.default_factory is not MISSING:
                out[f.name] = f.default_factory()
        return out


def parse_option(config: type, text: str, hidden: tuple[str, ...] = ()) -> tuple[str, object]:
    """KEY=VALUE from the command line, the value parsed by the option's declared type. Keys in `hidden`
    (set by their own flags) are refused here."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    known = {f.name: f for f in fields(config)}
    if not sep or not key:
        raise HeadshareError(f"option {text!r}: expected KEY=VALUE")
    if key not in known or key in hidden:
        raise HeadshareError(f"{config.__name__} has no option {key!r}; its options: "
                             f"{', '.join(k for k in known if k not in hidden) or 'none'}")
    hints = typing.get_type_hints(config)
    return key, parse_value(hints[key], raw.strip(), key)


def parse_value(tp, raw: str, key: str):
    """`raw` read as the type `tp` (bool, int, float, str, or a union of them with None)."""
    union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    args = typing.get_args(tp) if union else (tp,)
    if type(None) in args and raw.lower() in ("none", "null", ""):
        return None
    for t in (a for a in args if a is not type(None)):
        if t is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
        elif t is int:
            try:
                return int(raw)
            except ValueError:
                pass
        elif t is float:
            try:
                return float(raw)
            except ValueError:
                pass
        elif t is str:
            return raw
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    raise HeadshareError(f"option {key}: {raw!r} is not {' or '.join(words.get(a, str(a)) for a in args)}")
