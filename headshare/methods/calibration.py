"""Calibration: one pipeline that walks the model's blocks in order on calibration text, one block at a time.

Every data-aware method and the report see the model through `walk`:

1. *Catch.* The base model runs once with every block replaced by a pass-through that records its call
   (position embeddings, attention mask, ... per block, so models whose layers differ, like Gemma 3's
   sliding and global layers, get each layer's own) and hands the hidden states on unchanged. The first
   block's input is the embedding output. Nothing heavy runs.
2. *Walk.* For each block in order: move it to the compute device (unless it lives there already, or
   accelerate placed it), run it on its input in micro-batches of sequences with hooks that keep what the
   methods read (the attention module's call, the o projection's input and output), hand the layer's
   `LayerData` to the method, take the block's outputs as the next block's input, and move it back.

So memory holds one block's weights and one block's activations on the calibration tokens at a time (plus
what the method keeps), whatever the depth, and a model larger than the device is calibrated with its
weights left in CPU memory (`device=` a GPU while the model stays on the CPU: the offload mode). The
activations between blocks wait on the CPU in the offload mode and on the device otherwise.

A method that needs the model as the plan will make it (the sequential refits) keeps its own second stream:
at each layer it runs the edited block on its stream with `LayerData.run_block`, while `walk` carries the
original one. Statistics are accumulated in float32/float64 whatever the model's dtype. What a method keeps
from a layer until a later phase, and which would grow with depth (a basis group's input Grams, its basis and
coefficient map), waits on disk in a `Stash` while other layers run.

`borrowed_z` re-runs one layer's attention with other units' q/k/v slices swapped in, so what is measured
is exactly what `share` computes; the block is restored after every swap.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..arch import Layout, arch_spec, blocks, layout_of
from ..config import is_integer
from ..errors import HeadshareError
from ..units import coef_key, fitted_key, get_slices, o_columns, own_index, refuse_shared, set_slices, unit_z
from .gram import LayerGram

# sequences per forward call of a block: bounds the block's intermediate activations (attention scores, the
# MLP's inner width) on large calibration sets; the default calibration (8 x 512 tokens) runs as one call
BATCH_TOKENS = 8192
# token rows turned into float64 at a time (`_layer_data`'s token weights, `lstsq.refit_moments`): what they
# compute then takes memory of the layer's width, not of the calibration size (a (tokens, hidden) float64
# copy is 1.2 GB on SmolLM2 at 256k tokens, 8.6 GB on a 7B layer)
CHUNK_ROWS = 16384


class Stash:
    """Tensors set aside on disk (a temporary directory, removed on `close` or exit) between the pipeline's
    phases, read back one entry at a time onto the device they left. What a 7B basis group keeps from the
    first walk to the refit, its two folds' input Grams (256 MB of float64), its basis and coefficient map
    (about 100 MB each), is one group's worth a few layers long: held in memory for every group it grew the
    working memory with depth (2 GB of Grams alone at 32 layers, about 20 GB on an 80-layer 70B model).
    The last entry read stays cached, since readers go through the groups in order."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="headshare-stash-")
        self._where: dict = {}
        self._last: tuple = (None, None)

    def __setitem__(self, key, tensors: tuple[torch.Tensor, ...]) -> None:
        path = Path(self._dir.name) / f"{len(self._where)}.pt"
        torch.save(tuple(t.detach().cpu() for t in tensors), path)
        self._where[key] = (path, tensors[0].device)
        self._last = (None, None)

    def __getitem__(self, key) -> tuple[torch.Tensor, ...]:
        if self._last[0] != key:
            path, device = self._where[key]
            self._last = (None, None)  # free the cached entry before the next one is read
            self._last = (key, tuple(t.to(device) for t in torch.load(path, weights_only=True)))
        return self._last[1]

    def __contains__(self, key) -> bool:
        return key in self._where

    def close(self) -> None:
        self._last = (None, None)
        self._dir.cleanup()

    def __enter__(self) -> Stash:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def source_ids(tokenizer, source: str) -> list[tuple[str, torch.Tensor]]:
    """(name, token ids (1-D)) of each text source in `source`: one source, or a mix of several joined by "+"
    ("builtin:calib+news+code"), each read with split="calib"."""
    from ..data import load_text, tokenize

    if tokenizer is None:
        raise HeadshareError("this method needs a tokenizer for its calibration text (pass tokenizer=...)")
    names = [s.strip() for s in source.split("+")]
    if not all(names):
        raise HeadshareError(f"text {source!r} has an empty source; mix sources as SOURCE+SOURCE")
    return [(name, tokenize(tokenizer, load_text(name, split="calib"), bos=False)) for name in names]


def calibration_ids(model, tokenizer, calib: str, calib_tokens: int, block_size: int = 512) -> torch.Tensor:
    """(n, block) token ids of the calibration text, at most `calib_tokens` tokens in all; a mix of sources
    ("a+b") gives each an equal share, packed in blocks of its own."""
    from ..data import pack_blocks

    parts = source_ids(tokenizer, calib)
    share = calib_tokens // len(parts)
    max_pos = getattr(model.config, "max_position_embeddings", None) or block_size
    block = max(2, min(block_size, max_pos, share))
    if len(parts) == 1:
        ids = parts[0][1][:calib_tokens]
        if len(ids) < 2:
            raise HeadshareError(f"calibration text {calib!r} has fewer than 2 tokens")
        return pack_blocks(ids, block, short=True)  # a short text still calibrates, as one shorter block
    blocks = []
    for name, ids in parts:
        if len(ids) < block:
            raise HeadshareError(f"calibration source {name!r} has {len(ids):,} tokens, fewer than one "
                                 f"block of {block} of the mix")
        blocks.append(pack_blocks(ids[:share], block))
    return torch.cat(blocks)


# -- calls and devices ------------------------------------------------------------------------------------

def _replace_hidden(call: tuple, x: torch.Tensor | None) -> tuple:
    args, kwargs = call
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": x}
    return (x, *args[1:]), kwargs


def _hidden(call: tuple) -> torch.Tensor:
    args, kwargs = call
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _to(obj, device: torch.device, dtype: torch.dtype | None = None):
    """Tensors inside nested tuples, lists and dicts moved to `device` (and floating ones cast to `dtype` if
    given; other values as they are)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device, dtype, non_blocking=True)
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def compute_dtype(module: nn.Module, device: torch.device) -> torch.dtype | None:
    """The dtype `module` computes in on `device` during calibration: float32 for a half-precision module on
    a CPU without matrix units for that dtype, None (its own) elsewhere. The statistics read the activations
    in float32 or float64 either way, so a bf16 model's plan is the fp32 one's up to rounding; computing in
    float32 from the rounded weights makes it so up to the weights' rounding alone, at a price that depends
    on the CPU: bf16 products ran 6x slower than float32 on one of these machines (a 7B block on 512 tokens,
    2 cores: 20.1 s against 3.4 s) and 4.8x faster on one with AMX (4096 x 4096 x 11008, 1.7 TFLOP/s against
    361 GFLOP/s). So a CPU with AMX computes a bf16 block in bf16 as a GPU does (`native_half`), and a bf16
    plan made there can differ from one made on a CPU without AMX by the activations' rounding."""
    p = next(module.parameters(), None)
    if p is None or torch.device(device).type != "cpu" or p.dtype not in (torch.bfloat16, torch.float16):
        return None
    return None if native_half(p.dtype) else torch.float32


def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies matrices of `dtype` in hardware (AMX tiles for bf16, AMX-FP16 for fp16)."""
    probe = {torch.bfloat16: "_is_amx_tile_supported", torch.float16: "_is_amx_fp16_supported"}.get(dtype)
    check = getattr(torch.cpu, probe, None) if probe else None  # torch.cpu's probes; absent in older torch
    return bool(check()) if check is not None else False


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's weights are stored in (its input embedding's)."""
    return model.get_input_embeddings().weight.dtype


def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: accelerate's execution device for a dispatched module, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dispatched(module: nn.Module) -> bool:
    return hasattr(module, "_hf_hook")


@contextmanager
def on_device(module: nn.Module, device: torch.device):
    """`module` on `device` inside the block and back where it was after: the offload mode's one-block-at-a-
    time residence. A module that accelerate dispatched stays where accelerate put it."""
    home = module_device(module)
    if _dispatched(module):
        yield module
        return
    dtype = compute_dtype(module, device)
    if home == device and dtype is None:
        yield module
        return
    # the tensors themselves are put back afterwards (not converted back): nothing is rounded, and weights
    # that were memory-mapped stay so; edits made during the turn are dropped with the working copies
    saved = [(t, t.data) for t in (*module.parameters(), *module.buffers())]
    for t, data in saved:
        t.data = data.to(device, dtype) if dtype is not None and data.is_floating_point() else data.to(device)
    try:
        yield module
    finally:
        for t, data in saved:
            t.data = data


def run_block(module: nn.Module, call: tuple, x: torch.Tensor) -> torch.Tensor:
    """One block (or attention module) call with its hidden states replaced by `x`."""
    args, kwargs = _replace_hidden(call, x)
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# -- what one layer saw -------------------------------------------------------------------------------------

@dataclass
class LayerData:
    """What one layer saw on calibration text in the original model. Tensors are on the compute device;
    `rows[i]` are the sequences of micro-batch i, whose block call is `calls[i]` and attention call
    `attn_calls[i]`."""

    h: torch.Tensor  # (B, T, D) block input
    out: torch.Tensor  # (B, T, D) block output: the next block's input
    calls: list[tuple]  # per micro-batch (args, kwargs) of the block call, hidden states left out
    attn_calls: list[tuple]  # per micro-batch (args, kwargs) of the attention call, hidden states included
    rows: list[slice]
    z: torch.Tensor  # (N, in) o-projection input: every head's attention output
    a: torch.Tensor  # (N, D) o-projection output: the layer's attention output
    w: torch.Tensor  # (N, 1) float64 token weights 1 / ||h + a||^2

    @property
    def x(self) -> torch.Tensor:
        """(N, D) the attention module's input (the block input after its norm)."""
        return torch.cat([_hidden(c).reshape(-1, self.h.shape[-1]) for c in self.attn_calls])

    @property
    def attn_call(self) -> tuple:
        """The attention call of a layer calibrated in one micro-batch."""
        if len(self.attn_calls) != 1:
            raise HeadshareError("this layer was calibrated in several micro-batches: use attn_calls")
        return self.attn_calls[0]

    @property
    def block_call(self) -> tuple:
        """The block call of a layer calibrated in one micro-batch (hidden states left out)."""
        if len(self.calls) != 1:
            raise HeadshareError("this layer was calibrated in several micro-batches: use calls")
        return self.calls[0]

    def run_block(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """`block` on another stream `h` (B, T, D) with this layer's calls: a second, edited model's pass."""
        outs = [run_block(block, call, h[rows].to(self.h.device)) for call, rows in zip(self.calls, self.rows,
                                                                                        strict=True)]
        return torch.cat(outs).to(h.device)

    def attention_z(self, block: nn.Module, layout: Layout, fixed: tuple[str, ...] = ()) -> torch.Tensor:
        """(N, in) the o projection's input when `block`'s attention (as it is now) runs on this layer's
        captured attention input. The call stops there: the o product itself is not needed. `fixed`: paths of
        projections in the block that the caller leaves as they are between calls on this layer (k and v when
        only query rows change): their outputs are computed once and replayed while their weights stay the
        same tensors, unchanged in place."""
        attn = block.get_submodule(arch_spec(layout.model_type).attention)
        got: list[torch.Tensor] = []

        def stop(_m, args):
            got.append(args[0].reshape(-1, args[0].shape[-1]))
            raise _AtO

        memo = self.__dict__.setdefault("_replay", {})
        mods = {path: block.get_submodule(path) for path in fixed}
        own = {path: m.__dict__.get("forward") for path, m in mods.items()}  # e.g. accelerate's hooked forward
        plain = {path: m.forward for path, m in mods.items()}
        handle = block.get_submodule(layout.o_projection().path).register_forward_pre_hook(stop)
        try:
            for i, (args, kwargs) in enumerate(self.attn_calls):
                for path, m in mods.items():
                    m.forward = _replaying(m, plain[path], memo, (path, i))
                try:
                    attn(*args, **kwargs)
                except _AtO:
                    pass
        finally:
            handle.remove()
            for path, m in mods.items():
                if own[path] is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = own[path]
        return torch.cat(got)


class _AtO(Exception):
    """Raised by `attention_z`'s hook once it holds the o projection's input."""


def _replaying(module: nn.Module, forward, memo: dict, key: tuple):
    """`forward` (the module's), its output kept under `key` in `memo` and given again while the module's
    weight is the same tensor at the same version (an in-place change of the weight computes anew)."""
    def replay(*args, **kwargs) -> torch.Tensor:
        w = module.weight
        stamp = (id(w), w._version)
        if key not in memo or memo[key][0] != stamp:
            memo[key] = (stamp, forward(*args, **kwargs))
        return memo[key][1]
    return replay


def _micro_batches(n: int, block: int, batch_tokens: int) -> list[slice]:
    per = max(1, batch_tokens // max(block, 1))
    return [slice(s, min(n, s + per)) for s in range(0, n, per)]


@torch.no_grad()
def _catch(model: nn.Module, ids: torch.Tensor, rows: list[slice]) -> tuple[torch.Tensor, list[list[tuple]]]:
    """The first block's input (B, T, D) and, per block and micro-batch, its call with the hidden states left
    out: the base model runs with every block a pass-through."""
    bl = blocks(model)
    calls: list[list[tuple]] = [[] for _ in bl]
    firsts = []

    def passthrough(i):
        def forward(*args, **kwargs):
            call = (args, dict(kwargs))
            if i == 0:
                firsts.append(_hidden(call))
            calls[i].append(_replace_hidden(call, None))
            return _hidden(call)
        return forward

    saved = {i: b.__dict__.get("forward") for i, b in enumerate(bl)}
    for i, b in enumerate(bl):
        b.forward = passthrough(i)
    device = module_device(model.get_input_embeddings())
    try:
        for r in rows:
            model.base_model(input_ids=ids[r].to(device), use_cache=False)
    finally:
        for i, b in enumerate(bl):
            if saved[i] is None:
                del b.forward
            else:
                b.forward = saved[i]
    return torch.cat(firsts), calls


@torch.no_grad()
def walk(model: nn.Module, ids: torch.Tensor, device: torch.device | str | None = None, progress: bool = False,
         desc: str = "calibration", batch_tokens: int | None = None) -> Iterator[tuple[int, LayerData]]:
    """Yield (layer, LayerData) for every block of the original model in order, computing on `device` (None:
    where each block is). The block is on the compute device while its data is yielded and may be edited by
    the caller, who restores it before asking for the next layer; the next block's input was taken before.

    >>> for layer, d in walk(model, ids, device="cuda"):     # doctest: +SKIP
    ...     stats[layer] = d.z.float().T @ d.z.float()
    """
    from tqdm.auto import tqdm

    refuse_shared(model, "calibration")
    layout = layout_of(model.config)  # the attention and o paths, the same for every unit kind
    apath, opath = arch_spec(layout.model_type).attention, layout.o_projection().path
    bl = blocks(model)
    rows = _micro_batches(ids.shape[0], ids.shape[1], batch_tokens or BATCH_TOKENS)
    was_training = model.training
    model.eval()
    try:
        h, calls = _catch(model, ids, rows)
        offload = device is not None and any(module_device(b) != torch.device(device) for b in bl)
        home = torch.device("cpu") if offload else None  # where the stream waits between blocks
        for i in tqdm(range(len(bl)), desc=desc, disable=not progress, unit="layer"):
            block = bl[i]
            compute = torch.device(device) if device is not None else module_device(block)
            with on_device(block, compute):
                d = _layer_data(block, apath, opath, h, calls[i], rows, compute)
                yield i, d
                h = d.out if home is None else d.out.to(home)
    finally:
        model.train(was_training)


def _layer_data(block: nn.Module, apath: str, opath: str, h: torch.Tensor, calls: list[tuple], rows: list[slice],
                device: torch.device) -> LayerData:
    seen: dict[str, list] = {"attn": [], "z": [], "a": []}

    def keep_attn(_m, args, kwargs):
        seen["attn"].append((args, dict(kwargs)))

    def keep_o(_m, args, out):
        seen["z"].append(args[0].reshape(-1, args[0].shape[-1]))
        seen["a"].append(out.reshape(-1, out.shape[-1]))

    handles = [block.get_submodule(apath).register_forward_pre_hook(keep_attn, with_kwargs=True),
               block.get_submodule(opath).register_forward_hook(keep_o)]
    dtype = compute_dtype(block, device) if not _dispatched(block) else None
    h = h.to(device, dtype) if dtype is not None else h.to(device)
    calls = [_to(c, device, dtype) for c in calls]
    try:
        out = torch.cat([run_block(block, call, h[r]) for call, r in zip(calls, rows, strict=True)])
    finally:
        for hd in handles:
            hd.remove()
    z, a = torch.cat(seen["z"]), torch.cat(seen["a"])
    hs = h.reshape(-1, h.shape[-1])
    w = torch.cat([1.0 / (((x.double() + y.double()) ** 2).sum(-1, keepdim=True) + 1e-12)
                   for x, y in zip(hs.split(CHUNK_ROWS), a.split(CHUNK_ROWS), strict=True)])
    return LayerData(h=h, out=out, calls=calls, attn_calls=seen["attn"], rows=rows, z=z, a=a, w=w)


@torch.no_grad()
def stream(model: nn.Module, ids: torch.Tensor, device: torch.device | str | None = None,
           edit=None, progress: bool = False, desc: str = "blocks",
           batch_tokens: int | None = None) -> torch.Tensor:
    """The last block's output (B, T, D) on `ids`, the blocks run in turn on one stream, one on the compute
    device at a time, each inside `edit(layer)` (a context manager that edits it while it runs) if given.
    Unlike `walk`, nothing of the original model is kept or computed."""
    from tqdm.auto import tqdm

    bl = blocks(model)
    rows = _micro_batches(ids.shape[0], ids.shape[1], batch_tokens or BATCH_TOKENS)
    was_training = model.training
    model.eval()
    try:
        h, calls = _catch(model, ids, rows)
        offload = device is not None and any(module_device(b) != torch.device(device) for b in bl)
        for i in tqdm(range(len(bl)), desc=desc, disable=not progress, unit="layer"):
            compute = torch.device(device) if device is not None else module_device(bl[i])
            with on_device(bl[i], compute), (edit(i) if edit is not None else nullcontext()):
                dtype = compute_dtype(bl[i], compute) if not _dispatched(bl[i]) else None
                x = h.to(compute, dtype) if dtype is not None else h.to(compute)
                out = torch.cat([run_block(bl[i], _to(c, compute, dtype), x[r])
                                 for c, r in zip(calls[i], rows, strict=True)])
            h = out.cpu() if offload else out
    finally:
        model.train(was_training)
    return h


@torch.no_grad()
def head_loss(model: nn.Module, ids: torch.Tensor, last: torch.Tensor) -> float:
    """Mean next-token loss (nats) over (n, T) `ids` given the last block's output `last` (n, T, D): the
    model's own forward with its blocks passed through and the first one answering `last`, so the final norm,
    the head and the loss are the model's own, whatever the family."""
    bl = blocks(model)
    saved = {i: b.__dict__.get("forward") for i, b in enumerate(bl)}
    total, count = 0.0, 0
    try:
        for row in range(ids.shape[0]):
            for i, b in enumerate(bl):
                b.forward = (lambda *a, _row=row, **k: last[_row:_row + 1].to(_hidden((a, k)))) if i == 0 \
                    else (lambda *a, **k: _hidden((a, k)))
            device = module_device(model.get_input_embeddings())
            x = ids[row:row + 1].to(device)
            out = model(input_ids=x, labels=x, use_cache=False)
            total += float(out.loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    finally:
        for i, b in enumerate(bl):
            if saved[i] is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = saved[i]
    return total / count


def held_out_loss(model: nn.Module, ids: torch.Tensor, plan=None, device=None, progress: bool = False) -> float:
    """Mean next-token loss (nats) of `model` over (n, T) token ids, one sequence per block call, or of the
    model as `plan` would make it (`plan_applied`, one block at a time: no copy of the model is made)."""
    edit = None if plan is None else (lambda layer: plan_applied(model, plan, layer))
    last = stream(model, ids, device, edit, progress, desc="score", batch_tokens=ids.shape[1])
    return head_loss(model, ids, last)


@contextmanager
def plan_applied(model: nn.Module, plan, layer: int):
    """Inside the block, layer `layer` of `model` computes what `share(model, plan)` would make it compute,
    with dense weights standing in for the shared structure: borrowed units hold their root's slices (as
    fitted, o scaled), pruned units zeros, fitted unit slices replace the model's, and basis layers hold
    their coefficients times the basis. The layer's weights are restored on leaving."""
    layout = layout_of(model.config, plan.unit_kind)
    bl, U = blocks(model), layout.units_per_layer
    block = bl[layer]
    roots = plan.roots()
    scales = {(a.layer, a.unit): a.scale for a in plan.assignments}
    pruned = {tuple(p) for p in plan.pruned}
    projs = layout.projections()
    group = plan.basis_layers().get(layer)
    based = [] if group is None else plan.basis_projections(layout, group)
    touched = projs + [p for p in based if p not in projs]
    saved = {p.path: [t.data.clone() for t in block.get_submodule(p.path).parameters(recurse=False)]
             for p in touched}

    def stored(lay: int, u: int) -> dict:
        """A unit's slices as the shared model stores them: fitted slices in place of the model's."""
        slices = get_slices(bl[lay], layout, u)
        for p in projs:
            w = plan.fitted.get(fitted_key(lay, p.path, u))
            if w is not None:
                slices[p.path] = (w, slices[p.path][1])
        return slices

    try:
        for u in range(U):
            if (layer, u) in pruned:
                set_slices(block, layout, u, {k: (torch.zeros_like(w), None if b is None else torch.zeros_like(b))
                                              for k, (w, b) in get_slices(block, layout, u).items()})
            elif (layer, u) in roots:
                slices = stored(*roots[(layer, u)])
                o = layout.o_projection().path
                slices[o] = (slices[o][0] * scales.get((layer, u), 1.0), slices[o][1])
                set_slices(block, layout, u, slices)
            else:
                set_slices(block, layout, u, stored(layer, u))
        if group is not None:
            basis = plan.fitted[f"basis{group}"].double()
            own = [u for u in range(U) if (layer, u) not in pruned and (layer, u) not in roots]
            for p in based:
                mod = block.get_submodule(p.path)
                idx = own_index(p, [0] if p in layout.layer_projections() else own)
                if not len(idx):
                    continue
                coef = plan.fitted[coef_key(layer, p.path)].double()
                coef = coef.T if p.conv1d else coef  # (rows, rank)
                w = mod.weight.data.T if p.conv1d else mod.weight.data  # (out, in) view
                w[idx.to(w.device)] = (coef @ basis).to(device=w.device, dtype=w.dtype)
        yield block
    finally:
        for p in touched:
            for t, old in zip(block.get_submodule(p.path).parameters(recurse=False), saved[p.path], strict=True):
                t.data.copy_(old)


def capture(model: nn.Module, ids: torch.Tensor, device=None) -> list[LayerData]:
    """Every layer's `LayerData` at once: `walk` kept whole, for small models and tests (it holds every
    layer's activations; methods walk instead)."""
    return [d for _, d in walk(model, ids, device)]


# -- borrowed units ----------------------------------------------------------------------------------------

def reads_own_kv(layout: Layout) -> bool:
    """Whether a borrowed unit's output depends on which of its layer's key/value heads its slot reads:
    query-head units of a model with several key/value heads."""
    return layout.query_units and layout.num_kv_heads > 1


def source_key(layout: Layout, source: tuple[int, int], unit: int) -> tuple:
    """The feature key of `source` borrowed by `unit`: the source itself, or with query-head units on a
    grouped-query model (source layer, source unit, key/value head of `unit`), since the borrowed query
    head attends with the key/value head of the slot it fills. `key[:2]` is always the source."""
    return (*source, layout.kv_group(unit)) if reads_own_kv(layout) else tuple(source)


def source_keys(layout: Layout, sources: list[tuple[int, int]]) -> list[tuple]:
    """Every feature key of these sources that some unit of a layer can borrow (`source_key`)."""
    if not reads_own_kv(layout):
        return [tuple(s) for s in sources]
    return [(*s, g) for s in sources for g in range(layout.num_kv_heads)]


@torch.no_grad()
def borrowed_z(model: nn.Module, d: LayerData, layout: Layout, layer: int, sources: list[tuple]) -> dict:
    """{key: (N, width)} the heads' outputs that a source's q/k/v weights give on `layer`'s input (`d`); a
    key is a source (layer, unit), or (layer, unit, key/value head) to run it in a slot reading that head
    (`source_key`).

    The sources are swapped into the slots of `layer`'s own units, as many at a time as it has units,
    and the layer's attention module is re-run on its captured input; the slots are restored after.
    """
    bl = blocks(model)
    paths = [p.path for p in layout.in_projections()]
    U = layout.units_per_layer
    block = bl[layer]
    # slots by the key/value head they read: a 3-part key must fill a slot of its head
    slots = {g: [u for u in range(U) if layout.kv_group(u) == g] for g in range(layout.num_kv_heads)}
    queue = {g: [k for k in sources if len(k) == 3 and k[2] == g] for g in slots}
    free = [k for k in sources if len(k) == 2]
    runs = []
    while any(queue.values()) or free:
        run = {}
        for g, mine in slots.items():
            for slot in mine:
                if queue[g]:
                    run[slot] = queue[g].pop(0)
                elif free:
                    run[slot] = free.pop(0)
        runs.append(run)
    saved = {u: get_slices(block, layout, u) for u in range(U)}
    out = {}
    try:
        for run in runs:
            for slot, key in run.items():
                set_slices(block, layout, slot, get_slices(bl[key[0]], layout, key[1]), paths)
            z = d.attention_z(block, layout)
            for slot, key in run.items():
                out[key] = unit_z(z, layout, slot)
    finally:
        for u in range(U):
            set_slices(block, layout, u, saved[u])
    return out


def layer_gram(model, d: LayerData, layout: Layout, layer: int, sources: list) -> LayerGram:
    """The layer's own units and the given sources (run on this layer's input `d`, under every `source_keys`
    key) as a `LayerGram`."""
    block = blocks(model)[layer]
    dev = d.z.device
    feats = {("own", u): unit_z(d.z, layout, u) for u in range(layout.units_per_layer)}
    cols = {("own", u): o_columns(block, layout, u).to(dev) for u in range(layout.units_per_layer)}
    for s, z in (borrowed_z(model, d, layout, layer, source_keys(layout, sources)) if sources else {}).items():
        feats[s], cols[s] = z, o_columns(blocks(model)[s[0]], layout, s[1]).to(dev)
    return LayerGram(feats, cols, d.w, key=lambda s, u: source_key(layout, s, u))


WINDOW = 6  # sources are searched in this many preceding layers (the best ones were 1-5 layers back)


def window_ok(w) -> bool:
    """Whether `w` is a valid source window: an integer >= 1, or None for every earlier layer."""
    return w is None or (is_integer(w) and w >= 1)


def candidate_sources(layer: int, U: int, window: int | None, removed) -> list[tuple[int, int]]:
    """The units of the `window` layers before `layer` (None: all earlier layers) not in `removed`."""
    lo = 0 if window is None else max(0, layer - window)
    return [(sl, su) for sl in range(lo, layer) for su in range(U) if (sl, su) not in removed]
