"""Calibration: the token ids of calibration text, and what each layer of the original model sees on them.

`capture` runs the model once and keeps every layer's block input, its attention module's call, the o
projection's input (every head's output) and output, and the token weights 1 / ||h + a||^2 that put
every error in units of the residual stream it is added to. `borrowed_z` re-runs one layer's attention
with other units' q/k/v slices swapped in, so what is measured is exactly what `share` computes.
The model is restored after every swap: nothing here leaves it changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import Layout, arch_spec, blocks, layout_of
from ..units import get_slices, o_columns, refuse_shared, set_slices, unit_z
from .lstsq import LayerGram


def calibration_ids(model, tokenizer, calib: str, calib_tokens: int, block_size: int = 512) -> torch.Tensor:
    """(n, block) token ids of the calibration text, at most `calib_tokens` tokens in all."""
    from ..data import load_text, tokenize

    if tokenizer is None:
        raise ValueError("this method needs a tokenizer for its calibration text (pass tokenizer=...)")
    max_pos = getattr(model.config, "max_position_embeddings", None) or block_size
    block = max(2, min(block_size, max_pos, calib_tokens))
    ids = tokenize(tokenizer, load_text(calib, split="calib"), bos=False)[:calib_tokens]
    if len(ids) < 2:
        raise ValueError(f"calibration text {calib!r} has fewer than 2 tokens")
    if len(ids) < block:  # a short text still calibrates, as one shorter block
        return ids[None]
    n = len(ids) // block
    return ids[: n * block].view(n, block)


@dataclass
class LayerData:
    """What one layer saw on calibration text in the original model."""

    h: torch.Tensor  # (B, T, D) block input
    block_call: tuple  # (args, kwargs) of the block call, hidden states left out
    attn_call: tuple  # (args, kwargs) of the attention call, hidden states included
    z: torch.Tensor  # (N, in) o-projection input: every head's attention output
    a: torch.Tensor  # (N, D) o-projection output: the layer's attention output
    w: torch.Tensor  # (N, 1) float64 token weights 1 / ||h + a||^2


def _replace_hidden(call: tuple, x: torch.Tensor | None) -> tuple:
    args, kwargs = call
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": x}
    return (x, *args[1:]), kwargs


def run_block(module: nn.Module, call: tuple, x: torch.Tensor) -> torch.Tensor:
    args, kwargs = _replace_hidden(call, x)
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture(model: nn.Module, ids: torch.Tensor) -> list[LayerData]:
    """Run the original model once on `ids` (one batch) and keep every layer's inputs and outputs."""
    refuse_shared(model, "calibration")
    layout = layout_of(model.config)
    apath, o = arch_spec(layout.model_type).attention, layout.o_projection()
    bl = blocks(model)
    seen: dict[tuple[str, int], object] = {}

    def keep(kind, layer):
        def pre(_m, args, kwargs):
            seen[(kind, layer)] = (args, dict(kwargs))
        return pre

    def o_hook(layer):
        def fn(_m, args, out):
            seen[("o", layer)] = (args[0], out)
        return fn

    handles = []
    for i, b in enumerate(bl):
        handles.append(b.register_forward_pre_hook(keep("block", i), with_kwargs=True))
        handles.append(b.get_submodule(apath).register_forward_pre_hook(keep("attn", i), with_kwargs=True))
        handles.append(b.get_submodule(o.path).register_forward_hook(o_hook(i)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        model.base_model(input_ids=ids.to(device), use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    layers = []
    for i in range(len(bl)):
        bargs, bkw = seen[("block", i)]
        h = bkw["hidden_states"] if "hidden_states" in bkw else bargs[0]
        z, a = seen[("o", i)]
        z, a = z.reshape(-1, z.shape[-1]), a.reshape(-1, a.shape[-1])
        resid = h.reshape(-1, h.shape[-1]).double() + a.double()
        w = 1.0 / ((resid ** 2).sum(-1, keepdim=True) + 1e-12)
        layers.append(LayerData(h=h, block_call=_replace_hidden((bargs, bkw), None), attn_call=seen[("attn", i)],
                                z=z, a=a, w=w))
    return layers


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
def borrowed_z(model: nn.Module, data: list[LayerData], layer: int, sources: list[tuple]) -> dict:
    """{key: (N, width)} the heads' outputs that a source's q/k/v weights give on `layer`'s input; a key is
    a source (layer, unit), or (layer, unit, key/value head) to run it in a slot reading that head
    (`source_key`).

    The sources are swapped into the slots of `layer`'s own units, as many at a time as it has units,
    and the layer's attention module is re-run on its captured input; the slots are restored after.
    """
    layout = layout_of(model.config)
    bl, apath = blocks(model), arch_spec(layout.model_type).attention
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
    o = block.get_submodule(layout.o_projection().path)
    got: dict = {}
    out = {}
    handle = o.register_forward_pre_hook(lambda _m, args: got.__setitem__("z", args[0]))
    try:
        for run in runs:
            for slot, key in run.items():
                set_slices(block, layout, slot, get_slices(bl[key[0]], layout, key[1]), paths)
            args, kwargs = data[layer].attn_call
            block.get_submodule(apath)(*args, **kwargs)
            z = got["z"].reshape(-1, got["z"].shape[-1])
            for slot, key in run.items():
                out[key] = unit_z(z, layout, slot)
    finally:
        handle.remove()
        for u in range(U):
            set_slices(block, layout, u, saved[u])
    return out



def layer_gram(model, data: list[LayerData], layout: Layout, layer: int, sources: list) -> LayerGram:
    """The layer's own units and the given sources (run on this layer's input, under every `source_keys`
    key) as a `LayerGram`."""
    bl, d = blocks(model), data[layer]
    feats = {("own", u): unit_z(d.z, layout, u) for u in range(layout.units_per_layer)}
    cols = {("own", u): o_columns(bl[layer], layout, u) for u in range(layout.units_per_layer)}
    for s, z in (borrowed_z(model, data, layer, source_keys(layout, sources)) if sources else {}).items():
        feats[s], cols[s] = z, o_columns(bl[s[0]], layout, s[1])
    return LayerGram(feats, cols, d.w, key=lambda s, u: source_key(layout, s, u))


def candidate_sources(layer: int, U: int, window: int | None, removed) -> list[tuple[int, int]]:
    lo = 0 if window is None else max(0, layer - window)
    return [(sl, su) for sl in range(lo, layer) for su in range(U) if (sl, su) not in removed]


