"""headshare: head-wise weight sharing for the attention of large language models.

>>> import headshare
>>> plan = headshare.make_plan(model, 0.3, "fitshare", tokenizer=tok)   # doctest: +SKIP
>>> headshare.share(model, plan)                                      # doctest: +SKIP
>>> model.save_pretrained("smollm2-shared")                           # doctest: +SKIP
>>> model = headshare.load("smollm2-shared")                          # doctest: +SKIP

Modules, one step each: `arch` (what each model family's attention looks like), `units` (reading and
writing a unit's slices), `similarity` (the paper's weight analysis), `plan` (the plan document),
`methods` (the registry of plan-making methods and their configs), `sharing` (applying a plan),
`checkpoint` (saving and loading shared models), `posttrain` (PostShare), `evaluate`, `bench`,
`report`, `data`, `fetch`, `files`, `cli`.
"""

from importlib.metadata import PackageNotFoundError, version

from .arch import ARCHITECTURES, Layout, UnsupportedModelError, layout_of
from .checkpoint import info, load
from .config import Config
from .errors import HeadshareError
from .methods import (
    METHODS,
    ActShareConfig,
    AlignShareConfig,
    AutoShareConfig,
    BasisShareConfig,
    CalibConfig,
    ChoiceShareConfig,
    DirectShareConfig,
    FitPruneConfig,
    FitShareConfig,
    LayerwiseConfig,
    MethodConfig,
    PruneConfig,
    RandomConfig,
    make_config,
    make_plan,
    register_method,
)
from .plan import Assignment, SharePlan
from .sharing import SharedProjection, share, unique_parameters
from .similarity import similarity_matrix

try:
    __version__ = version("headshare")  # one version: the package metadata's (pyproject.toml)
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ARCHITECTURES", "METHODS", "ActShareConfig", "AlignShareConfig", "Assignment", "AutoShareConfig",
    "BasisShareConfig", "CalibConfig", "ChoiceShareConfig", "Config", "DirectShareConfig", "FitPruneConfig",
    "FitShareConfig", "HeadshareError", "Layout", "LayerwiseConfig", "MethodConfig", "PostTrainConfig",
    "PruneConfig", "RandomConfig", "SharePlan", "SharedProjection", "UnsupportedModelError", "info", "layout_of",
    "load", "make_config", "make_plan", "register_method", "share", "similarity_matrix", "unique_parameters",
]


def __getattr__(name: str):
    # posttrain imports the transformers Trainer, seconds that `import headshare` should not pay up front
    if name == "PostTrainConfig":
        from .posttrain import PostTrainConfig

        return PostTrainConfig
    raise AttributeError(f"module 'headshare' has no attribute {name!r}")
