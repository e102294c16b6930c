"""The shared structure: projections whose unit slices live in another layer, and the bases of basis groups.

`apply_structure` replaces every attention projection named by the architecture mapping with a
`SharedProjection`. Each one stores only the slices of the units its layer still owns, under the same
state-dict key (`...q_proj.weight`, now with fewer rows). q/k/v keep the original weight's orientation;
an o projection that the plan touches (it lends, borrows or loses units) is stored input-major, (own input
features, out) as GPT-2's Conv1D stores it (`STORAGE` 2), so that each unit's slice is contiguous rows: a
column slice of an (out, in) weight is a strided read, and on a Llama-2-7B layer whose o projection has 28
runs a decoding step took 11.1 ms instead of 3.0 ms (the dense layer's) that way. An untouched one keeps the
original orientation and computes exactly as before (at ratio 0 the logits are bit-identical; transposed,
products of fewer than 16 tokens round differently). A borrowed unit holds a reference to the projection
that owns its root unit and slices that weight at run time: the slice is a view, so nothing is copied and
one tensor serves both layers, in memory, in gradients and on disk.

In a layer of a basis group (`SharePlan.bases`) the input-side projections store (rows, rank)
coefficients instead of (rows, hidden) weights, and first project their input onto the group's
`SharedBasis`, one (rank, hidden) matrix registered once, in the group's first layer, as
`headshare_basis`; the other layers hold a reference to it, as borrowed units do.

`headshare.share` builds this structure from a model's weights; `headshare.checkpoint` builds it empty
and assigns a saved checkpoint's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Layout, ProjSpec, arch_spec, blocks
from .errors import HeadshareError
from .files import release_mapped
from .plan import SharePlan
from .units import basis_key, coef_key, own_index

# from this many tokens in a call, a shared projection whose runs are narrow gathers its weight and runs one
# product; below it (decoding), a product per run reads the weights once without the copy
GATHER_MIN_TOKENS = 16
# ... and only where its runs average fewer weight elements than this: a wider run is an efficient product on
# its own (7B shape, 512 tokens, 32 runs of 128 x 4096: a product per run 117-151 ms, the gathered weight's
# copy and product 159-198 ms, the dense layer 107-136 ms); SmolLM2's runs (192 x 576) are far below it
GATHER_MAX_RUN = 1 << 18

# how shared checkpoints store the o projection: 1 (before) as the original weight, 2 input-major; the
# checkpoint records it and `headshare.checkpoint` transposes a version-1 checkpoint's o weights on load
STORAGE = 2


BASIS_NAME = "headshare_basis"  # attribute of the attention module of a basis group's first layer


class SharedBasis(nn.Module):
    """One (rank, hidden) input basis that the q/k/v projections of a group of layers read through."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"rank={self.weight.shape[0]}, hidden={self.weight.shape[1]}"


class SharedProjection(nn.Module):
    """A Linear/Conv1D whose per-unit slices are either its own, borrowed from another layer, or pruned."""

    headshare_shared = True  # units.SHARED_MARKER: how the rest of the package tells a shared model

    def __init__(self, proj: ProjSpec, units: int, own: list[int], weight: torch.Tensor | None,
                 bias: torch.Tensor | None, out_features: int, in_features: int, input_major: bool = False):
        super().__init__()
        self.proj, self.units, self.own = proj, units, list(own)
        self.out_features, self.in_features = out_features, in_features
        self.input_major = input_major  # an o projection stored transposed from the original (out, in) weight
        self.dim = stored_dim(proj, input_major)  # the dimension of `weight` that unit slices cut
        self.xw = proj.conv1d or self.input_major  # `weight` stored (in, out): y = x @ w
        self.weight = nn.Parameter(weight) if weight is not None else None
        self.bias = nn.Parameter(bias) if bias is not None else None
        # (module, start, stop, scale) runs in feature order; module None means zeros (a pruned unit)
        self._segments: list[tuple[SharedProjection | None, int, int, float]] = []
        self._own_runs: list[tuple[int, int, int]] | None = None  # see _own_only
        self.__dict__["_basis"] = None  # a SharedBasis the input is projected on first (basis layers)

    def use_basis(self, basis: SharedBasis) -> None:
        """Read the input through `basis`: the stored weight is then (rows, rank) coefficients."""
        self.__dict__["_basis"] = basis  # a reference, not a child: the group's first layer owns it

    # Storage layout: own units in increasing order, part by part (q of all own units, then k, ...).
    def own_range(self, unit: int, part: int) -> tuple[int, int]:
        k = self.own.index(unit)
        width = self.proj.parts[part][2]
        start = sum(w for _, _, w in self.proj.parts[:part]) * len(self.own) + k * width
        return start, start + width

    def link(self, sources: dict[int, tuple[SharedProjection, int] | None], scales: dict[int, float]) -> None:
        """Lay out the feature runs. `sources[u]` is (owner, unit) for a borrowed unit, None if pruned."""
        runs: list[tuple[SharedProjection | None, int, int, float]] = []
        for p, (_, _, width) in enumerate(self.proj.parts):
            for u in range(self.units):
                if u not in sources:
                    owner, unit, scale = self, u, 1.0
                elif sources[u] is None:
                    owner, unit, scale = None, u, 0.0
                else:
                    (owner, unit), scale = sources[u], (scales.get(u, 1.0) if self.proj.role == "in" else 1.0)
                start, stop = owner.own_range(unit, p) if owner is not None else (0, width)
                prev = runs[-1] if runs else None
                if prev and prev[0] is owner and prev[3] == scale and (owner is None or prev[2] == start):
                    runs[-1] = (owner, prev[1], prev[2] + width if owner is None else stop, scale)
                else:
                    runs.append((owner, start, stop, scale))
        # a plain list attribute keeps other layers' modules out of this module's children and state dict
        self.__dict__["_segments"] = runs
        self._run_size = self.out_features * self.in_features / len(runs)  # mean weight elements a run
        self._own_runs = self._own_only(runs)

    def _own_only(self, runs: list) -> list[tuple[int, int, int]] | None:
        """(feature start, stop, storage start) of each own run when the layer only keeps or prunes units (no
        borrowed or scaled run, at least one pruned) and its own runs tile the stored weight in order, else None.
        Such a layer computes with its stored weight in one product: no gathered copy, no products with zeros."""
        if len(runs) < 2 or any(o is not None and (o is not self or s != 1.0) for o, _, _, s in runs):
            return None
        own, pos, stored = [], 0, 0
        for owner, a, b, _ in runs:
            if owner is not None:
                if a != stored:
                    return None
                own.append((pos, pos + b - a, a))
                stored = b
            pos += b - a
        return own if own and stored == self.weight.shape[self.dim] else None

    def _w(self, owner: SharedProjection, start: int, stop: int) -> torch.Tensor:
        return owner.weight.narrow(self.dim, start, stop - start)

    def _project(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.xw:  # (in, out) weight
            y = x @ w
            return y + b if b is not None else y
        return F.linear(x, w, b)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's full weight (and bias) assembled from the runs: a temporary copy."""
        dim, ws, bs = self.dim, [], []
        owners = [o for o, *_ in self._segments if o is not None]
        ref = owners[0].weight
        out_bias = self.proj.role == "out" and any(o.bias is not None for o in owners)
        for owner, a, b, scale in self._segments:
            if owner is None:
                shape = list(ref.shape)
                shape[dim] = b - a
                ws.append(ref.new_zeros(shape))
            else:
                w = self._w(owner, a, b)
                ws.append(w * scale if scale != 1.0 else w)
            if out_bias:
                bs.append(owner.bias[a:b] if owner is not None else ref.new_zeros(b - a))
        bias = torch.cat(bs) if out_bias else (self.bias if self.proj.role == "in" else None)
        return torch.cat(ws, dim=dim), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._basis is not None:
            x = self._basis(x)
        segs = self._segments
        if self._own_runs is not None:
            return self._forward_own(x)
        if (len(segs) > 1 and x.numel() >= GATHER_MIN_TOKENS * x.shape[-1] and self._run_size < GATHER_MAX_RUN
                and any(o is not None for o, *_ in segs)):
            # many tokens, narrow runs: one matrix product over a gathered weight beats a product per run
            # (and, for o, partial sums); the copy is freed right after
            w, b = self._gathered()
            return self._project(x, w, b)
        if self.proj.role == "out":
            outs = []
            for owner, a, b, _ in segs:
                if owner is None:
                    outs.append(x.new_zeros(*x.shape[:-1], b - a))
                else:
                    bias = owner.bias[a:b] if owner.bias is not None else None
                    outs.append(self._project(x, self._w(owner, a, b), bias))
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        # role "in": the output is a sum over the input feature runs of each unit, accumulated in place
        if len(segs) == 1 and segs[0][0] is not None and segs[0][3] == 1.0:  # one run of its own: as the original
            y = self._project(x, self._w(*segs[0][:3]), None)
            return y + self.bias if self.bias is not None else y
        x2 = x.reshape(-1, x.shape[-1])
        y = None
        pos = 0
        for owner, a, b, scale in segs:
            n = b - a
            if owner is not None:
                w = self._w(owner, a, b)
                xs, w = x2[:, pos:pos + n], (w if self.xw else w.T)
                if y is None:
                    y = xs @ w if scale == 1.0 else (xs @ w) * scale
                else:
                    y.addmm_(xs, w, alpha=scale)
            pos += n
        y = x.new_zeros(*x.shape[:-1], self.out_features) if y is None else y.reshape(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y

    def _forward_own(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of a layer that only keeps or prunes units: its stored weight is exactly the kept
        units' slices, so one product over it, and the pruned features are zeros in the output (q/k/v) or
        left out of the input (o)."""
        runs = self._own_runs
        if self.proj.role == "out":
            y = self._project(x, self.weight, self.bias)
            out = y.new_zeros(*y.shape[:-1], self.out_features)
            for start, stop, src in runs:
                out[..., start:stop] = y[..., src:src + stop - start]
            return out
        xs = [x[..., start:stop] for start, stop, _ in runs]
        return self._project(xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1), self.weight, self.bias)

    def extra_repr(self) -> str:
        rank = f", basis rank={self._basis.weight.shape[0]}" if self._basis is not None else ""
        return (f"{self.proj.path}, role={self.proj.role}, units={self.units}, own={len(self.own)}, "
                f"runs={len(self._segments)}{rank}")


def stored_dim(proj: ProjSpec, input_major: bool) -> int:
    """The dimension of a SharedProjection's stored weight that unit slices cut: the original weight's
    (`ProjSpec.weight_dim`), or the first when it is stored input-major."""
    return 0 if input_major else proj.weight_dim()


def transposed(proj: ProjSpec) -> bool:
    """Whether storing this projection input-major transposes it (an o projection held as nn.Linear; a
    Conv1D's is input-major already)."""
    return proj.role == "in" and not proj.conv1d


def _project_weight(proj: ProjSpec, module: nn.Module, own: list[int],
                    input_major: bool = False) -> tuple[torch.Tensor | None, ...]:
    """The own-unit slices of a projection's weight (and bias), in SharedProjection's storage layout
    (`input_major`: an nn.Linear o weight transposed to (own inputs, out))."""
    if not own:
        return None, (module.bias.detach().clone() if proj.role == "in" and module.bias is not None else None)
    idx = own_index(proj, own)
    weight = module.weight.detach().index_select(proj.weight_dim(), idx.to(module.weight.device))
    weight = (weight.T if input_major else weight).contiguous()
    bias = None
    if module.bias is not None:
        bias = module.bias.detach().clone() if proj.role == "in" else module.bias.detach()[idx].contiguous()
    return weight, bias


def _empty_weight(proj: ProjSpec, module: nn.Module, own: list[int], rank: int | None = None,
                  input_major: bool = False) -> tuple[torch.Tensor | None, ...]:
    """Uninitialised tensors of the shapes `_project_weight` would give (inputs cut to `rank` in a basis
    layer), for a model about to be loaded."""
    w, b = module.weight, module.bias
    weight = None
    if own:
        shape = list(w.shape)[::-1] if input_major else list(w.shape)
        shape[stored_dim(proj, input_major)] = proj.unit_width * len(own)
        if rank is not None:
            shape[1 - proj.weight_dim()] = rank
        weight = torch.empty(shape, dtype=w.dtype, device=w.device)
    if b is not None and (own or proj.role == "in"):
        b = torch.empty(b.shape[0] if proj.role == "in" else proj.unit_width * len(own), dtype=b.dtype)
    else:
        b = None
    return weight, b


def _features(proj: ProjSpec, module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if proj.conv1d else (w.shape[0], w.shape[1])


def _make_bases(model: nn.Module, plan: SharePlan, layout: Layout, copy_weights: bool) -> dict[int, SharedBasis]:
    """Layer -> its group's SharedBasis, each registered once in its group's first layer."""
    out = {}
    apath = arch_spec(layout.model_type).attention
    ref = blocks(model)[0].get_submodule(layout.o_projection().path).weight
    for g, b in enumerate(plan.bases):
        if copy_weights:
            w = plan.fitted[basis_key(g)].detach().to(device=ref.device, dtype=ref.dtype).clone()
        else:
            w = torch.empty(b["rank"], layout.hidden_size, dtype=ref.dtype, device=ref.device)
        basis = SharedBasis(w)
        first = min(b["layers"])
        blocks(model)[first].get_submodule(apath).add_module(BASIS_NAME, basis)
        out.update(dict.fromkeys(b["layers"], basis))
    return out


def check_basis_tensors(plan: SharePlan, layout: Layout) -> None:
    """Refuse a plan whose bases lack their tensors or whose tensors have the wrong shapes."""
    pruned = {tuple(p) for p in plan.pruned}
    whole = layout.layer_projections()
    for g, b in enumerate(plan.bases):
        want = {basis_key(g): (b["rank"], layout.hidden_size)}
        for layer in b["layers"]:
            own = [u for u in range(layout.units_per_layer) if (layer, u) not in pruned]
            for proj in plan.basis_projections(layout, g):
                if own or proj in whole:
                    rows = proj.unit_width * (1 if proj in whole else len(own))
                    want[coef_key(layer, proj.path)] = (rows, b["rank"]) if not proj.conv1d else (b["rank"], rows)
        for key, shape in want.items():
            if key not in plan.fitted:
                raise HeadshareError(f"basis {g} needs the fitted tensor {key!r}, which the plan does not carry")
            if tuple(plan.fitted[key].shape) != shape:
                raise HeadshareError(f"fitted tensor {key!r} has shape {tuple(plan.fitted[key].shape)}, basis {g} "
                                 f"needs {shape}")


def apply_structure(model: nn.Module, plan: SharePlan, layout: Layout, copy_weights: bool = True) -> None:
    """Replace every attention projection of `model` by a `SharedProjection` laid out as `plan` says: with
    `copy_weights` the own slices (and a basis group's fitted tensors) are copied in; without, the tensors
    are left uninitialised for a checkpoint's weights to be assigned."""
    roots = plan.roots()
    scales = {(a.layer, a.unit): a.scale for a in plan.assignments}
    pruned = {tuple(p) for p in plan.pruned}
    U = layout.units_per_layer
    bases = _make_bases(model, plan, layout, copy_weights)
    kv_bases = {layer for b in plan.bases if b.get("kv") for layer in b["layers"]}
    lenders = {rl for rl, _ in roots.values()}
    new: dict[tuple[int, str], SharedProjection] = {}
    whole: dict[tuple[int, str], SharedProjection] = {}
    for layer, block in enumerate(blocks(model)):
        gone = {u for u in range(U) if (layer, u) in roots or (layer, u) in pruned}
        own = [u for u in range(U) if u not in gone]
        touched = bool(gone) or layer in lenders  # its o projection is stored input-major (module docstring)
        cut = [(proj, U, own, new) for proj in layout.projections()]
        if layer in kv_bases:  # k/v outside the units, on the basis: one unit that the layer always owns
            cut += [(proj, 1, [0], whole) for proj in layout.layer_projections()]
        for proj, units, owned, into in cut:
            old = block.get_submodule(proj.path)
            based = layer in bases and proj.role == "out"
            rank = bases[layer].weight.shape[0] if based else None
            major = touched and into is new and transposed(proj)
            weight, bias = (_project_weight(proj, old, owned, major) if copy_weights
                            else _empty_weight(proj, old, owned, rank, major))
            if based and copy_weights and owned:
                weight = plan.fitted[coef_key(layer, proj.path)].detach().to(
                    device=old.weight.device, dtype=old.weight.dtype).clone()
            out_f, in_f = _features(proj, old)
            into[(layer, proj.path)] = SharedProjection(proj, units, owned, weight, bias, out_f, in_f, major)
            if based:
                into[(layer, proj.path)].use_basis(bases[layer])
    for mod in whole.values():
        mod.link({}, {})
    for (layer, path), mod in new.items():
        sources = {}
        for u in range(U):
            if (layer, u) in pruned:
                sources[u] = None
            elif (layer, u) in roots:
                rl, ru = roots[(layer, u)]
                sources[u] = (new[(rl, path)], ru)
        mod.link(sources, {u: scales[(layer, u)] for u in range(U) if (layer, u) in scales})
    replaced = []
    for (layer, path), mod in {**new, **whole}.items():
        parent_path, _, name = path.rpartition(".")
        parent = blocks(model)[layer].get_submodule(parent_path) if parent_path else blocks(model)[layer]
        replaced += [p.detach() for p in getattr(parent, name).parameters(recurse=False)]
        setattr(parent, name, mod)
    if copy_weights:  # what they kept is copied: the originals' memory-mapped pages would stay resident
        release_mapped(replaced)


