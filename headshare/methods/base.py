"""The core every method builds on: the config base classes, the registry, option and METHOD@UNIT parsing, and
`make_plan`, which runs a registered method."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields

import torch
from torch import nn

from ..arch import UNIT_KINDS, layout_of
from ..config import Config, check, is_integer, is_number
from ..config import parse_option as _parse_option
from ..errors import HeadshareError
from ..plan import SharePlan, units_for_ratio
from ..units import refuse_shared

CONFIG_VERSION = 1


@dataclass
class MethodConfig(Config):
    """Options shared by every method: the fraction of all attention units to remove, and what a unit is
    ("kv": a key/value head with its query heads; "query": one query head, see `headshare.arch`)."""

    ratio: float = 0.0
    unit: str = "kv"

    def __post_init__(self) -> None:
        check(self, "ratio", is_number(self.ratio) and 0 <= self.ratio < 1, "a number in [0, 1)")
        check(self, "unit", self.unit in UNIT_KINDS, f"one of {', '.join(UNIT_KINDS)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["unit"] == "kv":  # the default unit, as configs from before unit kinds read
            del d["unit"]
        return {**d, "version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> MethodConfig:
        return super().from_dict(d, version=CONFIG_VERSION)

    @classmethod
    def options(cls) -> dict[str, object]:
        """{option: default} for every option but the ratio and the unit."""
        return {f.name: (f.default if f.default is not MISSING else None) for f in fields(cls)
                if f.name not in ("ratio", "unit")}


@dataclass
class CalibConfig(MethodConfig):
    """Options of methods that read calibration text."""

    calib: str = "builtin:calib"  # a text source for `headshare.data.load_text`, read with split="calib"
    calib_tokens: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "calib", isinstance(self.calib, str) and self.calib.strip() != "", "a text source")
        check(self, "calib_tokens", is_integer(self.calib_tokens) and self.calib_tokens >= 2, "an integer >= 2")


MethodFn = Callable[..., SharePlan]  # (model, config, tokenizer, progress[, device]) -> SharePlan


@dataclass(frozen=True)
class Method:
    name: str
    config: type[MethodConfig]
    fn: MethodFn
    help: str
    needs_tokenizer: bool
    takes_device: bool = False  # fn has a `device` parameter (methods written before it have not)


METHODS: dict[str, Method] = {}


def register_method(name: str, config: type[MethodConfig], help: str = "",
                    needs_tokenizer: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Add a method and its config class to the registry; the CLI's --method choices come from here."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise HeadshareError(f"method {name!r} is already registered")
        takes_device = "device" in inspect.signature(fn).parameters
        METHODS[name] = Method(name, config, fn, help or (fn.__doc__ or "").strip().splitlines()[0], needs_tokenizer,
                               takes_device)
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise HeadshareError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def method_of(config: MethodConfig) -> Method:
    """The registered method whose config class `config` is."""
    for m in METHODS.values():
        if type(config) is m.config:
            return m
    raise HeadshareError(f"{type(config).__name__} is the config of no registered method")


def make_config(method: str, ratio: float = 0.0, **options) -> MethodConfig:
    """The config of `method` with these options; unknown ones are refused with the list of valid ones."""
    return get_method(method).config.from_dict({"ratio": ratio, **options})


def parse_option(config: type[MethodConfig], text: str) -> tuple[str, object]:
    """KEY=VALUE from the command line for a method's config (the ratio has its own flag)."""
    return _parse_option(config, text, hidden=("ratio",))


def split_method(name: str) -> tuple[str, str | None]:
    """"METHOD@UNIT" as (method, unit kind): "fitprune@query" is fitprune on query-head units; a name without
    "@" names no unit (None). A unit that is not one of `UNIT_KINDS` is refused."""
    method, sep, unit = name.partition("@")
    if sep and unit not in UNIT_KINDS:
        raise HeadshareError(f"method {name!r}: the unit after '@' must be one of {', '.join(UNIT_KINDS)}")
    return method, (unit if sep else None)


def make_plan(model: nn.Module, ratio: float | MethodConfig = 0.0, method: str | None = None, *,
              tokenizer=None, progress: bool = False, device: torch.device | str | None = None,
              **options) -> SharePlan:
    """Make a sharing plan for `model` with a registered method; the model is not changed.

    Either a config (`make_plan(model, FitShareConfig(ratio=0.3), tokenizer=tok)`) or a ratio, a method
    name (default "directshare") and its options as keywords (`make_plan(model, 0.3, "random", seed=1)`).
    `device` is where calibration computes, one block at a time (None: where each block is); a model left on
    the CPU with `device="cuda"` is calibrated with only one block on the GPU at a time (offloading).

    >>> plan = make_plan(model, ratio=0.3)                                   # doctest: +SKIP
    """
    if isinstance(ratio, MethodConfig):
        if options or method is not None:
            raise HeadshareError("give either a config or a method name with options, not both")
        config, m = ratio, method_of(ratio)
    else:
        m = get_method(method or "directshare")
        config = m.config.from_dict({"ratio": ratio, **options})
    refuse_shared(model, "planning")
    layout = layout_of(model.config, config.unit)
    units_for_ratio(config.ratio, layout)  # fail on a ratio the model cannot take before any work
    if m.needs_tokenizer and tokenizer is None and units_for_ratio(config.ratio, layout):
        raise HeadshareError(f"method {m.name!r} reads calibration text and needs a tokenizer (tokenizer=...)")
    # the method cuts units of `config.unit` and passes the kind on to what it calls
    if m.takes_device:
        plan = m.fn(model, config, tokenizer, progress, device=None if device is None else torch.device(device))
    elif device is not None:
        raise HeadshareError(f"method {m.name!r} computes where the model is: move the model instead of device=")
    else:
        plan = m.fn(model, config, tokenizer, progress)
    plan.method, plan.ratio, plan.config = m.name, config.ratio, config.to_dict()
    # a method may choose the unit kind (autoshare's candidates): the plan is checked against its own
    plan.validate(layout_of(model.config, plan.unit_kind))
    return plan


