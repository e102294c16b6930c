"""headshare: head-wise weight sharing for the attention of large language models.

>>> import headshare
>>> plan = headshare.plan(model, ratio=0.3)          # doctest: +SKIP
>>> headshare.share(model, plan)                     # doctest: +SKIP
>>> model.save_pretrained("smollm2-shared")          # doctest: +SKIP
>>> model = headshare.load("smollm2-shared")         # doctest: +SKIP
"""

from . import calibrated, methods  # noqa: F401  (register random, layerwise, prune; actshare, fitshare, fitprune)
from .arch import ARCHITECTURES, Layout, UnsupportedModelError, layout_of
from .plan import METHODS, Assignment, SharePlan, make_plan, register_method
from .share import SharedProjection, info, load, share, unique_parameters
from .similarity import similarity_matrix

plan = make_plan

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "METHODS", "Assignment", "Layout", "SharePlan", "SharedProjection",
    "UnsupportedModelError", "info", "layout_of", "load", "make_plan", "plan", "register_method", "share",
    "similarity_matrix", "unique_parameters",
]
