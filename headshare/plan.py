"""The sharing plan: which units borrow which other unit's weights, as a versioned, editable JSON document.

A plan is pure data. Methods (the paper's DirectShare selection, baselines, better variants) are
functions registered in `METHODS` that turn a model into a plan; `headshare.share` applies any plan.

Rules every plan obeys, whatever made it:
- A unit borrows from a unit of a strictly earlier layer, so there are no cycles.
- Chains are resolved to their root: if (3, 0) borrows from (2, 1) and (2, 1) itself borrows from
  (0, 2), then (3, 0) reads the stored weights of (0, 2). That is exactly what copying weights in
  layer order would give, because by then (2, 1) already holds a copy of (0, 2).
- A borrowed unit's output may be scaled (`scale`, default 1); a pruned unit is removed outright.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .arch import Layout, layout_of

PLAN_VERSION = 1


@dataclass
class Assignment:
    """Unit (layer, unit) reads the weights of unit (source_layer, source_unit)."""

    layer: int
    unit: int
    source_layer: int
    source_unit: int
    score: float | None = None  # the method's match score, for people reading the plan
    scale: float = 1.0  # factor on the borrowed unit's attention output


@dataclass
class SharePlan:
    """Which units are shared (and pruned) in one model. Save with `save`, read with `SharePlan.load`."""

    layout: dict
    method: str
    ratio: float
    assignments: list[Assignment] = field(default_factory=list)
    pruned: list[tuple[int, int]] = field(default_factory=list)
    metric: str | None = None
    unit: str = ""
    notes: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["pruned"] = [list(p) for p in self.pruned]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SharePlan:
        if not isinstance(d, dict) or "assignments" not in d or "layout" not in d:
            raise ValueError("not a headshare plan: expected a JSON object with 'layout' and 'assignments'")
        if d.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise ValueError(f"plan version {d['version']} is newer than this headshare understands "
                             f"({PLAN_VERSION}); upgrade headshare")
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        fields["assignments"] = [Assignment(**a) for a in d["assignments"]]
        fields["pruned"] = [tuple(p) for p in d.get("pruned", [])]
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SharePlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None

    # -- meaning --------------------------------------------------------------------------------------
    @property
    def units_shared(self) -> int:
        return len(self.assignments)

    @property
    def units_removed(self) -> int:
        return len(self.assignments) + len(self.pruned)

    def roots(self) -> dict[tuple[int, int], tuple[int, int]]:
        """Borrowing unit -> the unit whose stored weights it reads (chains followed to their root)."""
        src = {(a.layer, a.unit): (a.source_layer, a.source_unit) for a in self.assignments}
        out = {}
        for u in src:
            r = src[u]
            while r in src:
                r = src[r]
            out[u] = r
        return out

    def validate(self, layout: Layout) -> None:
        """Refuse a plan that does not fit `layout`, with a message naming the first problem."""
        mine = layout.to_dict()
        for key in ("model_type", "num_layers", "units_per_layer", "head_dim", "hidden_size"):
            if key in self.layout and self.layout[key] != mine[key]:
                raise ValueError(f"plan does not fit this model: plan has {key}={self.layout[key]}, "
                                 f"model has {mine[key]}")
        L, U = layout.num_layers, layout.units_per_layer

        def check(layer: int, unit: int, what: str) -> None:
            if not (0 <= layer < L and 0 <= unit < U):
                raise ValueError(f"plan names {what} unit ({layer}, {unit}), outside this model's "
                                 f"{L} layers x {U} units")

        seen: set[tuple[int, int]] = set()
        pruned = {tuple(p) for p in self.pruned}
        for a in self.assignments:
            check(a.layer, a.unit, "a borrowing")
            check(a.source_layer, a.source_unit, "a source")
            if a.source_layer >= a.layer:
                raise ValueError(f"unit ({a.layer}, {a.unit}) borrows from ({a.source_layer}, {a.source_unit}); "
                                 "sources must be in an earlier layer")
            if (a.layer, a.unit) in seen or (a.layer, a.unit) in pruned:
                raise ValueError(f"unit ({a.layer}, {a.unit}) appears twice in the plan")
            if (a.source_layer, a.source_unit) in pruned:
                raise ValueError(f"unit ({a.layer}, {a.unit}) borrows from a pruned unit")
            if not math.isfinite(a.scale):
                raise ValueError(f"unit ({a.layer}, {a.unit}) has a non-finite scale {a.scale}")
            seen.add((a.layer, a.unit))
        for p in pruned:
            check(*p, "a pruned")


def units_for_ratio(ratio: float, layout: Layout) -> int:
    """floor(ratio x all units), as in the authors' code; refuses ratios outside [0, 1)."""
    if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    # round first so that 0.3 * 90 = 26.999999999999996 still counts as 27
    n = math.floor(round(ratio * layout.units_total, 9))
    borrowers = (layout.num_layers - 1) * layout.units_per_layer
    if n > borrowers:
        raise ValueError(f"ratio {ratio} asks for {n} shared units but only {borrowers} units (those outside "
                         "layer 0) can borrow")
    return n


def dynamic_selection(sim: torch.Tensor, layout: Layout, ratio: float) -> list[Assignment]:
    """The paper's dynamic strategy on a unit similarity matrix.

    Each unit of layers >= 1 proposes its best match in any earlier layer; the floor(ratio x units)
    proposals with the highest similarity are taken. Ties in similarity are broken by position:
    the earlier (layer, unit) is taken first, and among equally good sources the earliest one wins.
    """
    from .similarity import best_earlier_matches

    n = units_for_ratio(ratio, layout)
    proposals = sorted(best_earlier_matches(sim, layout), key=lambda t: (-t[4], t[0], t[1]))
    chosen = sorted(proposals[:n], key=lambda t: (t[0], t[1]))
    return [Assignment(a, b, c, d, score=round(s, 6)) for a, b, c, d, s in chosen]


# -- method registry --------------------------------------------------------------------------------

MethodFn = Callable[..., SharePlan]
METHODS: dict[str, MethodFn] = {}
METHOD_HELP: dict[str, str] = {}


def register_method(name: str, help: str = "") -> Callable[[MethodFn], MethodFn]:
    """Add a plan-making method to the registry; the CLI's --method choices come from here."""

    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        METHOD_HELP[name] = help or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return deco


def new_plan(model, method: str, ratio: float, **kw) -> SharePlan:
    layout = layout_of(model.config)
    return SharePlan(layout=layout.to_dict(), method=method, ratio=ratio, unit=layout.describe_unit(), **kw)


@register_method("directshare", "the paper: qk weight cosine, dynamic selection, copy")
def directshare(model, ratio: float, metric: str = "qk", progress: bool = False, **_) -> SharePlan:
    """The paper's DirectShare selection: weight cosine of the match function, dynamic strategy."""
    from .similarity import similarity_matrix

    layout = layout_of(model.config)
    units_for_ratio(ratio, layout)  # fail on a bad ratio before any work
    sim = similarity_matrix(model, metric, progress=progress)
    return new_plan(model, "directshare", ratio, metric=metric,
                    assignments=dynamic_selection(sim, layout, ratio))


def make_plan(model, ratio: float, method: str = "directshare", **kw) -> SharePlan:
    """Make a sharing plan for `model` with a registered method.

    >>> plan = make_plan(model, ratio=0.3)                       # doctest: +SKIP
    >>> plan = make_plan(model, ratio=0.3, method="random", seed=0)  # doctest: +SKIP
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; registered: {', '.join(METHODS)}")
    plan = METHODS[method](model, ratio=ratio, **kw)
    plan.validate(layout_of(model.config))
    return plan
