"""The tiny models now come from conftest.py; these names remain until the tests use its fixtures."""

from conftest import TINY, copy_in, outputs
from conftest import build_tiny_model as tiny_model

__all__ = ["TINY", "copy_in", "outputs", "tiny_model"]
