"""Plan-making methods: one registry, one typed config per method, and `make_plan`.

A method is a function `fn(model, config, tokenizer, progress, device=None) -> SharePlan` registered with
its config dataclass; `device` is where the calibration pipeline computes (`calibration.walk`; None: where
the model is; a method without the parameter runs where the model is). It reads the model and never edits it: weights it fits travel with the plan (`SharePlan.fitted`)
and `headshare.share` applies them. The registry is explicit: the method families import below, each
registering its methods, and nothing else adds to `METHODS` unless a user registers one.

    >>> plan = make_plan(model, FitShareConfig(ratio=0.3), tokenizer=tok)          # doctest: +SKIP
    >>> plan = make_plan(model, 0.3, "random", seed=1)                              # doctest: +SKIP

Configs refuse unknown options and bad values with a ValueError that names them; the config a plan was
made with is recorded in `plan.config`.
"""

from __future__ import annotations

# the method families: importing them registers their methods, in this order
# isort: off
from . import directshare, baselines, actshare, fitshare, basis, auto  # noqa: F401
# isort: on
from .actshare import ActShareConfig
from .auto import AutoShareConfig
from .base import (
    CONFIG_VERSION,
    METHODS,
    CalibConfig,
    Method,
    MethodConfig,
    get_method,
    make_config,
    make_plan,
    method_of,
    parse_option,
    register_method,
    split_method,
)
from .baselines import LayerwiseConfig, PruneConfig, RandomConfig
from .basis import BasisShareConfig, ChoiceShareConfig
from .directshare import AlignShareConfig, DirectShareConfig
from .fitshare import FitPruneConfig, FitShareConfig

__all__ = ["CONFIG_VERSION", "METHODS", "ActShareConfig", "AlignShareConfig", "AutoShareConfig", "BasisShareConfig",
           "CalibConfig", "ChoiceShareConfig", "DirectShareConfig", "FitPruneConfig", "FitShareConfig",
           "LayerwiseConfig", "Method", "MethodConfig", "PruneConfig", "RandomConfig", "get_method", "make_config",
           "make_plan", "method_of", "parse_option", "register_method", "split_method"]
