"""`headshare` (the package's `__init__`): one version, every public config importable from `headshare`."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import headshare
from headshare.config import Config
from headshare.methods import METHODS


def test_version_is_the_package_metadata():
    assert headshare.__version__ == importlib.metadata.version("headshare")


def test_every_registered_methods_config_is_exported():
    for name, method in METHODS.items():
        cls = method.config
        assert getattr(headshare, cls.__name__) is cls, f"{name}: headshare.{cls.__name__} missing"
        assert cls.__name__ in headshare.__all__


def test_every_name_in_all_resolves_and_configs_are_configs():
    for name in headshare.__all__:
        obj = getattr(headshare, name)
        if name.endswith("Config"):
            assert issubclass(obj, Config), name
    from headshare.posttrain import PostTrainConfig

    assert headshare.PostTrainConfig is PostTrainConfig


def test_import_headshare_does_not_load_the_trainer():
    code = "import sys, headshare; assert 'headshare.posttrain' not in sys.modules; print(headshare.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == headshare.__version__
