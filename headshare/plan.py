"""The sharing plan: which units borrow which other unit's weights, which are pruned, and any weights a
method fitted, as a versioned document (JSON, plus a safetensors file when weights were fitted).

A plan is pure data: making one never edits the model (`headshare.methods`), and `headshare.share`
applies any plan, fitted weights included, in Python and on the command line alike.

Rules every plan obeys, whatever made it:
- A unit borrows from a unit of a strictly earlier layer, so there are no cycles.
- Chains are resolved to their root: if (3, 0) borrows from (2, 1) and (2, 1) itself borrows from
  (0, 2), then (3, 0) reads the stored weights of (0, 2). That is exactly what copying weights in
  layer order would give, because by then (2, 1) already holds a copy of (0, 2).
- A borrowed unit's output may be scaled (`scale`, default 1); a pruned unit is removed outright.
- Fitted weights (`fitted`) are unit slices, named "{layer}.{projection path}.unit{unit}", that
  replace the model's before the units are tied. They were fitted on particular weights, whose
  fingerprint `base_sha1` records, and are refused on any other.
- A basis group (`bases`, each {"layers": [...], "rank": r}) expresses the input-side projections
  (q, k, v) of its layers through one shared (r, hidden) basis: each projection keeps only its own units'
  (rows, r) coefficients. The group's tensors are fitted weights too: "basis{g}" for the basis and
  "{layer}.{projection path}.coef" for the coefficients. Units in basis layers neither borrow nor lend.
  With query-head units a group may also carry its layers' k and v, which are not cut into units: then
  its entry has "kv": true and those projections store (all their rows, r) coefficients too.
- The layout names the unit kind (`layout["unit_kind"]`, "kv" or "query", see `headshare.arch`);
  `headshare.share` cuts the model's units the way the plan does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import UNIT_KINDS, Layout, layout_of
from .config import is_integer, is_number
from .errors import HeadshareError
from .similarity import best_earlier_matches

# 2: method config, fitted weights beside the JSON; 3: shared bases; 4: the unit kind in the layout (older
# plans still load, as "kv" plans); 5: a basis may carry the k/v of query-unit layers ("kv")
PLAN_VERSION = 5


@dataclass
class Assignment:
    """Unit (layer, unit) reads the weights of unit (source_layer, source_unit)."""

    layer: int
    unit: int
    source_layer: int
    source_unit: int
    score: float | None = None  # the method's match score, for people reading the plan
    scale: float = 1.0  # factor on the borrowed unit's attention output


# the keys of a plan document (`SharePlan.to_dict`), and those a shared checkpoint adds beside them
PLAN_KEYS = frozenset({"layout", "method", "ratio", "assignments", "pruned", "metric", "unit", "config", "notes",
                       "fitted", "base_sha1", "bases", "version"})
CHECKPOINT_KEYS = ("base_class", "params_original", "bytes_original", "params_shared", "bytes_shared", "storage")
# a layout's keys: the integers that must be positive, and the ones plans before version 4 may lack
_LAYOUT_COUNTS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "units_per_layer")
_LAYOUT_OPTIONAL = ("num_heads", "num_kv_heads", "unit_kind")


def _check_layout(layout: dict) -> None:
    """Refuse a layout entry with unknown or missing keys, or counts that are not positive integers."""
    known = {"model_type", "unit_kind", *_LAYOUT_COUNTS}
    unknown, missing = set(layout) - known, known - set(_LAYOUT_OPTIONAL) - set(layout)
    if unknown or missing:
        raise HeadshareError(f"plan 'layout' {layout}: " + (f"unknown keys {sorted(unknown, key=str)}" if unknown
                                                            else f"missing {sorted(missing)}"))
    if not isinstance(layout["model_type"], str):
        raise HeadshareError(f"plan layout 'model_type' must be a string, got {layout['model_type']!r}")
    for key in _LAYOUT_COUNTS:
        if key in layout and not (is_integer(layout[key]) and layout[key] >= 1):
            raise HeadshareError(f"plan layout '{key}' must be a positive integer, got {layout[key]!r}")
    if layout.get("unit_kind", "kv") not in UNIT_KINDS:
        raise HeadshareError(f"plan layout 'unit_kind' must be one of {', '.join(UNIT_KINDS)}, "
                             f"got {layout['unit_kind']!r}")


def _assignment(i: int, a) -> Assignment:
    """Assignment `i` of a plan document, its keys and types checked (its range is `validate`'s)."""
    if not isinstance(a, dict):
        raise HeadshareError(f"plan assignment {i} is not an object: {a!r}")
    unknown = set(a) - set(Assignment.__dataclass_fields__)
    missing = {"layer", "unit", "source_layer", "source_unit"} - set(a)
    if unknown or missing:
        raise HeadshareError(f"plan assignment {i} {a}: " + (f"unknown keys {sorted(unknown, key=str)}" if unknown
                                                             else f"missing {sorted(missing)}"))
    if not all(is_integer(a[k]) for k in ("layer", "unit", "source_layer", "source_unit")):
        raise HeadshareError(f"plan assignment {i} {a}: layers and units must be integers")
    if not _real(a.get("scale", 1.0)) or not (a.get("score") is None or _real(a["score"])):
        raise HeadshareError(f"plan assignment {i} {a}: scale and score must be numbers")
    return Assignment(**a)


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
    config: dict = field(default_factory=dict)  # the method's config as it ran (`headshare.methods`)
    notes: dict = field(default_factory=dict)  # for people (scores, timings); share() never reads them
    fitted: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    base_sha1: str | None = None  # fingerprint of the attention weights `fitted` was fitted on
    fitted_names: list[str] = field(default_factory=list)  # what the document names; `fitted` holds the tensors
    bases: list[dict] = field(default_factory=list)  # [{"layers": [...], "rank": r}]: shared input-side bases
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.fitted and not self.fitted_names:
            self.fitted_names = sorted(self.fitted)

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON document: everything but the fitted tensors, which it names."""
        return {"layout": dict(self.layout), "method": self.method, "ratio": self.ratio,
                "assignments": [vars(a).copy() for a in self.assignments],
                "pruned": [list(p) for p in self.pruned], "metric": self.metric, "unit": self.unit,
                "config": dict(self.config), "notes": dict(self.notes),
                "fitted": sorted(self.fitted) or list(self.fitted_names), "base_sha1": self.base_sha1,
                "bases": [_basis_entry(b) for b in self.bases], "version": PLAN_VERSION}

    @classmethod
    def from_dict(cls, d: dict, fitted: dict[str, torch.Tensor] | None = None) -> SharePlan:
        """Read a plan document, checking every field's type and range (`validate` then checks it against a
        model's layout); a malformed entry is refused with a HeadshareError that names it."""
        if not isinstance(d, dict) or not isinstance(d.get("assignments"), list) or not isinstance(d.get("layout"), dict):
            raise HeadshareError("not a headshare plan: expected a JSON object with 'layout' and a list 'assignments'")
        version = d.get("version", 1)
        if not is_integer(version) or not 1 <= version <= PLAN_VERSION:
            raise HeadshareError(f"plan version {version!r} is not one this headshare reads (1 to {PLAN_VERSION}); "
                                 "a newer one needs a newer headshare")
        unknown = sorted(set(d) - PLAN_KEYS - set(CHECKPOINT_KEYS), key=str)
        if unknown:
            raise HeadshareError(f"plan has unknown keys {unknown}; a plan's keys: {', '.join(sorted(PLAN_KEYS))}")
        _check_layout(d["layout"])
        assignments = [_assignment(i, a) for i, a in enumerate(d["assignments"])]
        pruned = d.get("pruned", [])
        if not isinstance(pruned, list) or not all(isinstance(p, list | tuple) and len(p) == 2
                                                   and all(is_integer(x) for x in p) for p in pruned):
            raise HeadshareError(f"plan 'pruned' must be a list of [layer, unit] integer pairs, got {pruned!r}")
        for key, kind, what in (("method", str, "a string"), ("metric", str | None, "a string or null"),
                                ("unit", str, "a string"), ("config", dict | None, "an object"),
                                ("notes", dict | None, "an object"), ("base_sha1", str | None, "a string or null")):
            if key in d and not isinstance(d[key], kind):
                raise HeadshareError(f"plan '{key}' must be {what}, got {d[key]!r}")
        notes = dict(d.get("notes") or {})
        names = d.get("fitted", [])
        if version == 1 and notes.get("requires_weights"):
            # version 1 fitted plans could not carry their weights; applied without them they break the model
            names = ["(not stored: a version 1 plan fitted together with weights)"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise HeadshareError(f"plan 'fitted' must be a list of weight names, got {names!r}")
        bases = d.get("bases", [])
        if not isinstance(bases, list) or not all(
                isinstance(b, dict) and {"layers", "rank"} <= set(b) <= {"layers", "rank", "kv"} and is_integer(b["rank"])
                and isinstance(b["layers"], list) and b["layers"] and all(is_integer(x) for x in b["layers"])
                and isinstance(b.get("kv", False), bool) for b in bases):
            raise HeadshareError("plan 'bases' must be a list of {'layers': [integers], 'rank': integer, optional 'kv': "
                                 f"true/false}}, got {bases!r}")
        ratio = d.get("ratio")
        if not (is_number(ratio) and 0 <= ratio < 1):
            raise HeadshareError(f"plan 'ratio' must be a number in [0, 1), got {ratio!r}")
        return cls(layout=d["layout"], method=d.get("method", "?"), ratio=ratio, assignments=assignments,
                   pruned=[tuple(p) for p in pruned], metric=d.get("metric"), unit=d.get("unit", ""),
                   config=dict(d.get("config") or {}), notes=notes, fitted=dict(fitted or {}),
                   base_sha1=d.get("base_sha1"), fitted_names=list(names),
                   bases=[_basis_entry(b) for b in bases])

    def fitted_file(self, path: str | Path) -> Path:
        """Where the fitted tensors of the plan saved at `path` live: beside it, same stem, .safetensors."""
        return Path(path).with_suffix(".safetensors")

    def save(self, path: str | Path) -> None:
        """Write the JSON document and, if the plan carries fitted weights, the safetensors file beside it."""
        from safetensors.torch import save_file

        from .files import atomic_write

        path = Path(path)
        if path.suffix == ".safetensors":
            raise HeadshareError(f"{path}: give the plan a .json name; its fitted weights go beside it")
        if self.fitted:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.fitted.items()}
            atomic_write(self.fitted_file(path), lambda tmp: save_file(tensors, str(tmp)))
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.to_dict(), indent=1) + "\n"))

    @classmethod
    def load(cls, path: str | Path) -> SharePlan:
        """Read a plan written by `save` (with its fitted weights, if it names any)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no plan file {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HeadshareError(f"{path}: not valid JSON ({e})") from None
        try:
            plan = cls.from_dict(d)
        except ValueError as e:
            raise HeadshareError(f"{path}: {e}") from None
        if plan.fitted_names:
            from .files import read_safetensors

            file = plan.fitted_file(path)
            if not file.is_file():
                raise FileNotFoundError(f"{path} names {len(plan.fitted_names)} fitted weights, but {file.name} "
                                        "is not beside it")
            plan.fitted = read_safetensors(file)
            if sorted(plan.fitted) != sorted(plan.fitted_names):
                raise HeadshareError(f"{file}: holds other fitted weights than {path.name} names")
        return plan

    # -- meaning --------------------------------------------------------------------------------------
    @property
    def unit_kind(self) -> str:
        """What a unit of this plan is (`headshare.arch.UNIT_KINDS`); plans before unit kinds cut "kv" units."""
        return self.layout.get("unit_kind", "kv")

    @property
    def units_shared(self) -> int:
        return len(self.assignments)

    @property
    def units_removed(self) -> int:
        return len(self.assignments) + len(self.pruned)

    def basis_layers(self) -> dict[int, int]:
        """Layer -> index of the basis group that holds its input-side projections."""
        return {layer: g for g, b in enumerate(self.bases) for layer in b["layers"]}

    def basis_projections(self, layout: Layout, group: int) -> list:
        """The projections basis `group` carries: the input side of its units, and with "kv" the layers' k and
        v that are not cut into units (`Layout.layer_projections`)."""
        return layout.in_projections() + (layout.layer_projections() if self.bases[group].get("kv") else [])

    def based_rows(self, layout: Layout) -> str:
        """Which rows the bases hold, as "q", "q/k/v" (or "" without bases)."""
        parts = {part for g in range(len(self.bases)) for p in self.basis_projections(layout, g)
                 for part, _, _ in p.parts}
        return "/".join(x for x in "qkv" if x in parts)

    def units_based(self, units_per_layer: int) -> int:
        """Units whose q/k/v rows are coefficients on a shared basis (the kept units of basis layers)."""
        pruned = {tuple(p) for p in self.pruned}
        return sum(1 for layer in self.basis_layers() for u in range(units_per_layer) if (layer, u) not in pruned)

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
        if self.unit_kind != layout.unit_kind:
            raise HeadshareError(f"plan cuts {self.unit_kind!r} units, this layout {layout.unit_kind!r} units: apply it "
                             "with headshare.share, which reads the plan's unit kind")
        for key in ("model_type", "num_layers", "num_heads", "num_kv_heads", "units_per_layer", "head_dim", "hidden_size"):
            if key in self.layout and self.layout[key] != mine[key]:
                raise HeadshareError(f"plan does not fit this model: plan has {key}={self.layout[key]}, "
                                 f"model has {mine[key]}")
        L, U = layout.num_layers, layout.units_per_layer

        def check(layer: int, unit: int, what: str) -> None:
            if not (0 <= layer < L and 0 <= unit < U):
                raise HeadshareError(f"plan names {what} unit ({layer}, {unit}), outside this model's "
                                 f"{L} layers x {U} units")

        seen: set[tuple[int, int]] = set()
        pruned = {tuple(p) for p in self.pruned}
        for a in self.assignments:
            check(a.layer, a.unit, "a borrowing")
            check(a.source_layer, a.source_unit, "a source")
            if a.source_layer >= a.layer:
                raise HeadshareError(f"unit ({a.layer}, {a.unit}) borrows from ({a.source_layer}, {a.source_unit}); "
                                 "sources must be in an earlier layer")
            if (a.layer, a.unit) in seen or (a.layer, a.unit) in pruned:
                raise HeadshareError(f"unit ({a.layer}, {a.unit}) appears twice in the plan")
            if (a.source_layer, a.source_unit) in pruned:
                raise HeadshareError(f"unit ({a.layer}, {a.unit}) borrows from a pruned unit")
            if not math.isfinite(a.scale):
                raise HeadshareError(f"unit ({a.layer}, {a.unit}) has a non-finite scale {a.scale}")
            seen.add((a.layer, a.unit))
        for p in pruned:
            check(*p, "a pruned")
        if len(pruned) != len(self.pruned):
            raise HeadshareError("plan lists a pruned unit twice")
        in_basis: dict[int, int] = {}
        for g, b in enumerate(self.bases):
            if not 1 <= b["rank"] <= layout.hidden_size:
                raise HeadshareError(f"basis {g} has rank {b['rank']}; it must be in 1..{layout.hidden_size} (hidden size)")
            for layer in b["layers"]:
                if not 0 <= layer < L:
                    raise HeadshareError(f"basis {g} names layer {layer}, outside this model's {L} layers")
                if layer in in_basis:
                    raise HeadshareError(f"layer {layer} is in two bases ({in_basis[layer]} and {g})")
                in_basis[layer] = g
            if b.get("kv") and not layout.layer_projections():
                raise HeadshareError(f"basis {g} carries k/v rows beside its units ('kv'), which only query-head units "
                                 "leave outside the units")
        for a in self.assignments:
            if a.layer in in_basis or a.source_layer in in_basis:
                raise HeadshareError(f"unit ({a.layer}, {a.unit}) borrows from ({a.source_layer}, {a.source_unit}) "
                                 "across a basis layer; units of basis layers neither borrow nor lend")
        if self.fitted_names and not self.fitted:
            raise HeadshareError(f"this {self.method!r} plan names {len(self.fitted_names)} fitted weights but carries "
                             "none: read it with SharePlan.load(path), which takes the .safetensors file beside it")
        for k, t in self.fitted.items():
            if not torch.isfinite(t).all():
                raise HeadshareError(f"fitted weight {k!r} has non-finite values")


def units_for_ratio(ratio: float, layout: Layout) -> int:
    """floor(ratio x all units), as in the authors' code; refuses ratios outside [0, 1)."""
    if not (is_number(ratio) and 0 <= ratio < 1):
        raise HeadshareError(f"ratio must be in [0, 1), got {ratio!r}")
    # round first so that 0.3 * 90 = 26.999999999999996 still counts as 27
    n = math.floor(round(ratio * layout.units_total, 9))
    borrowers = (layout.num_layers - 1) * layout.units_per_layer
    if n > borrowers:
        raise HeadshareError(f"ratio {ratio} asks for {n} shared units but only {borrowers} units (those outside "
                         "layer 0) can borrow")
    return n


def dynamic_selection(sim: torch.Tensor, layout: Layout, ratio: float) -> list[Assignment]:
    """The paper's dynamic strategy on a unit similarity matrix.

    Each unit of layers >= 1 proposes its best match in any earlier layer; the floor(ratio x units)
    proposals with the highest similarity are taken. Ties in similarity are broken by position:
    the earlier (layer, unit) is taken first, and among equally good sources the earliest one wins.
    """
    n = units_for_ratio(ratio, layout)
    proposals = sorted(best_earlier_matches(sim, layout), key=lambda t: (-t[4], t[0], t[1]))
    chosen = sorted(proposals[:n], key=lambda t: (t[0], t[1]))
    return [Assignment(a, b, c, d, score=round(s, 6)) for a, b, c, d, s in chosen]


def new_plan(model, method: str, ratio: float, unit_kind: str | None = None, **fields) -> SharePlan:
    """An empty plan for `model` cutting units of `unit_kind` (its layout and unit recorded), with the given
    fields set."""
    layout = layout_of(model.config, unit_kind)
    return SharePlan(layout=layout.to_dict(), method=method, ratio=ratio, unit=layout.describe_unit(), **fields)


def _basis_entry(b: dict) -> dict:
    """A basis group as the document holds it ("kv" only when set, so older plans read and write the same)."""
    return {"layers": list(b["layers"]), "rank": b["rank"], **({"kv": True} if b.get("kv") else {})}
