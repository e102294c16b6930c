"""Reading and writing attention units in a model: the one place that touches unit slices of weights.

A unit's slices are cut by the architecture mapping (`headshare.arch`); everything here works on the
plain modules of an unshared model, in the weight's own storage orientation unless it says otherwise:

- `unit_slices` / `unit_views`: a projection weight (a block's tensors) as per-unit views, nn.Linear orientation;
- `get_slices` / `set_slices`: copies of one unit's weight and bias slices in every projection;
- `own_index`: feature indices of a set of units as a shared projection stores them;
- `o_columns` / `set_o_columns`: a unit's o-projection columns as a (hidden, width) float64 matrix;
- `unit_z`: a unit's features of the o projection's input (its heads' attention output);
- `head_slices` / `head_weights`: per query head q, k, v rows and o columns (the report's weight vectors and
  the symmetry-aligned similarity read heads only through these);
- `read_fitted` / `write_fitted`: named unit slices, the form in which a plan carries fitted weights;
- `is_shared` / `refuse_shared`: whether `headshare.share` already restructured a model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import torch
from torch import nn

from .arch import Layout, ProjSpec, UnsupportedModelError, arch_spec, blocks, layout_of
from .errors import HeadshareError

# the attribute SharedProjection sets on its class, so this module can tell without importing it
SHARED_MARKER = "headshare_shared"


def is_shared(model: nn.Module) -> bool:
    """True for a model that `headshare.share` restructured (or `headshare.load` rebuilt)."""
    return any(getattr(m, SHARED_MARKER, False) for m in model.modules())


def refuse_shared(model: nn.Module, action: str) -> None:
    """A clear error for steps that need the original, unshared weights."""
    if is_shared(model):
        raise HeadshareError(f"this model is already shared (a headshare checkpoint); {action} needs the original "
                         "model: give the model the shared one was made from")


def unit_slices(weight: torch.Tensor, proj: ProjSpec, units: int) -> dict[str, torch.Tensor]:
    """Cut a projection weight into per-unit views, in nn.Linear orientation.

    Returns {part name: tensor (units, width, in_features)} for output-sliced projections and
    {part name: tensor (units, out_features, width)} for input-sliced ones.
    """
    w = weight.t() if proj.conv1d else weight  # (out, in)
    out = {}
    for name, off, width in proj.parts:
        if proj.role == "out":
            out[name] = w[off: off + units * width].reshape(units, width, w.shape[1])
        else:
            out[name] = w[:, off: off + units * width].reshape(w.shape[0], units, width).permute(1, 0, 2)
    return out


def unit_views(block: nn.Module, layout: Layout, biases: bool = False) -> list[tuple[str, str, torch.Tensor]]:
    """(role, part, (units, ...) view) for every tensor of `block` with unit slices: live views that gradients
    and in-place updates reach. With `biases`, output-sliced biases too, as the weight of one extra input
    feature in the module's own orientation (part "q_bias", ...)."""
    out = []
    for proj in layout.projections():
        mod = block.get_submodule(proj.path)
        out += [(proj.role, name, v) for name, v in unit_slices(mod.weight, proj, layout.units_per_layer).items()]
        if biases and proj.role == "out" and getattr(mod, "bias", None) is not None:
            b = mod.bias.unsqueeze(0 if proj.conv1d else 1)
            out += [("out", f"{name}_bias", v) for name, v in unit_slices(b, proj, layout.units_per_layer).items()]
    return out


def _idx(proj: ProjSpec, unit: int, device) -> torch.Tensor:
    return proj.unit_index(unit).to(device)


def own_index(proj: ProjSpec, own: list[int]) -> torch.Tensor:
    """Feature indices of the units `own`, in a shared projection's storage layout (part by part)."""
    if not own:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.cat([torch.arange(off + u * w, off + (u + 1) * w) for u in own])
                      for _, off, w in proj.parts])


def get_slices(block: nn.Module, layout: Layout, unit: int) -> dict[str, tuple]:
    """{projection path: (weight slice, bias slice or None)}: copies of one unit, in storage orientation."""
    out = {}
    for p in layout.projections():
        mod = block.get_submodule(p.path)
        idx = _idx(p, unit, mod.weight.device)
        w = mod.weight.detach().index_select(p.weight_dim(), idx).clone()
        b = mod.bias.detach()[idx].clone() if p.role == "out" and mod.bias is not None else None
        out[p.path] = (w, b)
    return out


def set_slices(block: nn.Module, layout: Layout, unit: int, slices: dict[str, tuple],
               paths: Iterable[str] | None = None) -> None:
    """Write `get_slices` output into `unit` of `block` (only the projections in `paths`, if given)."""
    for p in layout.projections():
        if paths is not None and p.path not in paths:
            continue
        mod = block.get_submodule(p.path)
        w, b = slices[p.path]
        idx = _idx(p, unit, mod.weight.device)
        mod.weight.data.index_copy_(p.weight_dim(), idx, w.to(device=mod.weight.device, dtype=mod.weight.dtype))
        if b is not None:
            mod.bias.data[idx] = b.to(device=mod.bias.device, dtype=mod.bias.dtype)


def o_columns(block: nn.Module, layout: Layout, unit: int) -> torch.Tensor:
    """(hidden, width) float64: the o-projection columns of one unit, in nn.Linear orientation."""
    p = layout.o_projection()
    mod = block.get_submodule(p.path)
    w = mod.weight.detach().index_select(p.weight_dim(), _idx(p, unit, mod.weight.device)).double()
    return w.t() if p.conv1d else w


def set_o_columns(block: nn.Module, layout: Layout, unit: int, w: torch.Tensor) -> None:
    """Write (hidden, width) columns into one unit's slice of the o projection (cast to its dtype)."""
    p = layout.o_projection()
    mod = block.get_submodule(p.path)
    w = w.t() if p.conv1d else w
    mod.weight.data.index_copy_(p.weight_dim(), _idx(p, unit, mod.weight.device),
                                w.to(device=mod.weight.device, dtype=mod.weight.dtype))


def unit_z(z: torch.Tensor, layout: Layout, unit: int) -> torch.Tensor:
    """(N, width) float64: the features of an o-projection input (N, in) that belong to `unit`."""
    return z[:, _idx(layout.o_projection(), unit, z.device)].double()


def head_slices(block: nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """One block's weights per query head: q, k, v (H, d, D), each query head beside the rows of the key/value
    head it reads (k and v copied across a group, q and o views), and o (H, D, d). The unit kind of `layout` does not
    matter: heads are the finest cut of every kind."""
    spec = arch_spec(layout.model_type)
    d, H, KV = layout.head_dim, layout.num_heads, layout.num_kv_heads

    def heads(path: str, role: str, parts: tuple, n: int) -> dict[str, torch.Tensor]:
        return unit_slices(block.get_submodule(path).weight.detach(), ProjSpec(path, role, parts, spec.conv1d), n)

    if spec.qkv is not None:  # fused q/k/v: multi-head attention only (the layout refuses the rest)
        out = heads(spec.qkv, "out", (("q", 0, d), ("k", H * d, d), ("v", 2 * H * d, d)), H)
    else:
        out = heads(spec.q, "out", (("q", 0, d),), H)
        for name in ("k", "v"):
            out[name] = heads(getattr(spec, name), "out", ((name, 0, d),), KV)[name].repeat_interleave(H // KV, 0)
    out.update(heads(spec.o, "in", (("o", 0, d),), H))
    return out


def head_weights(model: nn.Module, layout: Layout) -> tuple[torch.Tensor, ...]:
    """Per query head of every layer, float32: q (L*H, d, D), its kv head's k and v (L*H, d, D), o (L*H, D, d)."""
    spec = arch_spec(layout.model_type)
    if not spec.rope or spec.q is None:
        raise UnsupportedModelError(f"per-head weights need separate q/k/v projections with RoPE; "
                                    f"{layout.model_type!r} has none")
    per_block = [head_slices(block, layout) for block in blocks(model)]
    return tuple(torch.cat([s[name].float() for s in per_block]) for name in "qkvo")


# -- fitted weights, as a plan carries them ------------------------------------------------------------

_FITTED_KEY = re.compile(r"^(\d+)\.(.+)\.unit(\d+)$")


def fitted_key(layer: int, path: str, unit: int) -> str:
    """Name of one unit's weight slice in a plan's fitted tensors: "{layer}.{projection path}.unit{unit}"."""
    return f"{layer}.{path}.unit{unit}"


def basis_key(group: int) -> str:
    """Name of a shared basis in a plan's fitted tensors: "basis{group}", an (rank, hidden) matrix."""
    return f"basis{group}"


def coef_key(layer: int, path: str) -> str:
    """Name of one projection's coefficients on its layer's basis: (own rows, rank) in storage orientation."""
    return f"{layer}.{path}.coef"


def is_unit_key(key: str) -> bool:
    """Whether a fitted tensor's name is a unit slice (`fitted_key`), not a basis or its coefficients."""
    return _FITTED_KEY.match(key) is not None


def read_fitted(model: nn.Module, units: Iterable[tuple[int, int]], paths: Iterable[str],
                layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """The current weight slices of `units` (cut as `layout` says; None: the model's default units) in the
    projections `paths`, keyed by `fitted_key`."""
    layout, bl = layout or layout_of(model.config), blocks(model)
    paths = set(paths)
    out = {}
    for layer, unit in sorted(units):
        for p, (w, _) in get_slices(bl[layer], layout, unit).items():
            if p in paths:
                out[fitted_key(layer, p, unit)] = w.contiguous()
    return out


def parse_fitted_key(key: str) -> tuple[int, str, int]:
    """(layer, projection path, unit) of a `fitted_key`; a malformed name is refused."""
    m = _FITTED_KEY.match(key)
    if not m:
        raise HeadshareError(f"fitted weight {key!r} is not named LAYER.PROJECTION.unitUNIT")
    return int(m.group(1)), m.group(2), int(m.group(3))


def write_fitted(model: nn.Module, layout: Layout, fitted: dict[str, torch.Tensor]) -> None:
    """Write named unit slices (`read_fitted`'s form, units cut as `layout` says) into the model. Every name and
    shape is checked first, so a slice that does not fit is refused with the model unchanged."""
    bl = blocks(model)
    projs = {p.path: p for p in layout.projections()}
    writes = []
    for key, w in fitted.items():
        layer, path, unit = parse_fitted_key(key)
        if path not in projs:
            raise HeadshareError(f"fitted weight {key!r} names no projection of this model")
        if not (0 <= layer < layout.num_layers and 0 <= unit < layout.units_per_layer):
            raise HeadshareError(f"fitted weight {key!r} is outside this model's {layout.num_layers} layers x "
                             f"{layout.units_per_layer} units")
        p, mod = projs[path], bl[layer].get_submodule(path)
        idx = _idx(p, unit, mod.weight.device)
        want = list(mod.weight.shape)
        want[p.weight_dim()] = len(idx)
        if list(w.shape) != want:
            raise HeadshareError(f"fitted weight {key!r} has shape {tuple(w.shape)}, this model's slice is {tuple(want)}")
        writes.append((p, mod, idx, w))
    with torch.no_grad():
        for p, mod, idx, w in writes:
            mod.weight.data.index_copy_(p.weight_dim(), idx, w.to(device=mod.weight.device, dtype=mod.weight.dtype))


def fingerprint(tensors) -> str:
    """SHA-1 of (name, tensor) pairs: names, dtypes, shapes and bytes."""
    h = hashlib.sha1()
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def weights_fingerprint(model: nn.Module, unit: str = "kv") -> str:
    """SHA-1 of every attention projection's weight and bias (dtype included), in the order the projections
    of `unit` units list them.

    With query-head units that includes k and v, which no unit owns: the fits depend on them too."""
    layout = layout_of(model.config, unit)
    return fingerprint((f"{i}.{p.path}.{name}", t) for i, block in enumerate(blocks(model))
                       for p in layout.projections() + layout.layer_projections()
                       for name, t in block.get_submodule(p.path).named_parameters(recurse=False))
