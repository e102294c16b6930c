"""What each row runs: the method names (METHOD@UNIT), the --option values and the config built from them."""

from __future__ import annotations

from ..errors import HeadshareError
from ..methods import METHODS, MethodConfig, get_method, parse_option, split_method
from .alternatives import ALTERNATIVES

DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.5)
DEFAULT_METHODS = ("directshare", "random", "layerwise", "prune")
# a row is reused by --resume only if it was made with the same settings
SETTING_KEYS = ("model", "text", "calib", "calib_tokens", "max_tokens", "window", "seed", "options", "dtype")


def resolve_methods(names) -> list[str]:
    """Method names with "all" expanded to every registered method, in registration order; a name may end
    in "@UNIT" (`split_method`) or be a whole-model alternative (`alternatives.ALTERNATIVES`)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        for m in (list(METHODS) if name == "all" else [name]):
            if m not in ALTERNATIVES and split_method(m)[0] not in METHODS:
                raise HeadshareError(f"unknown method {m!r}; registered: {', '.join(METHODS)}; whole-model "
                                     f"alternatives: {', '.join(ALTERNATIVES)}")
            if m not in out:
                out.append(m)
    if not out:
        raise HeadshareError("no methods given")
    return out


def parse_options(texts, methods) -> dict[str, object] | None:
    """`--option` texts (KEY=VALUE, or METHOD.KEY=VALUE for one method) as {key: value}, each parsed by the
    option's declared type; an option that none of `methods` has is refused. None when there are none."""
    methods = [m for m in methods if m not in ALTERNATIVES]  # they have no options
    out: dict[str, object] = {}
    for text in texts or ():
        key = text.partition("=")[0].strip()
        scope, _, name = key.rpartition(".")
        targets = [scope] if scope else [m for m in methods
                                         if name.replace("-", "_") in get_method(split_method(m)[0]).config.options()]
        if scope and scope not in methods:
            raise HeadshareError(f"option {text!r} is for method {scope!r}, which this run does not include")
        if not targets:
            raise HeadshareError(f"option {name!r} belongs to none of the methods {', '.join(methods)}")
        for m in targets:
            k, v = parse_option(get_method(split_method(m)[0]).config, f"{name}={text.partition('=')[2]}")
            out[f"{scope}.{k}" if scope else k] = v
    return out or None


def bench_config(method: str, ratio: float, settings: dict) -> MethodConfig:
    """The config one row runs: the shared settings (calib, calib_tokens, seed) and the --option values,
    each given to the methods whose config has that option."""
    base, unit = split_method(method)
    cfg = get_method(base).config
    names = cfg.options()
    kw = {k: settings[k] for k in ("calib", "calib_tokens", "seed") if k in names and settings.get(k) is not None}
    for key, v in (settings.get("options") or {}).items():
        scope, _, name = key.rpartition(".")
        if name in names and scope in ("", method):
            kw[name] = v
    if unit is not None:
        kw["unit"] = unit
    return cfg.from_dict({"ratio": ratio, **kw})

