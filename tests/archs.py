"""Tiny random models of every supported attention family, and an independent copy-in reference for sharing."""

from __future__ import annotations

import torch
import transformers

from headshare.arch import blocks, layout_of

# name -> (config class, model class, config kwargs); 3 layers so that chains of borrowing can occur
TINY = {
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-norm": ("Qwen3Config", "Qwen3ForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_head=4, n_layer=3, n_positions=64)),
    "bert": ("BertConfig", "BertModel", dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=3,
                                             intermediate_size=64, max_position_embeddings=64)),
}

COMMON = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              max_position_embeddings=64)


def tiny_model(name: str, seed: int = 0):
    cfg_cls, model_cls, kw = TINY[name]
    args = dict(kw) if name in ("gpt2", "bert") else {**COMMON, **kw}
    if name in ("gpt2", "bert"):
        args["vocab_size"] = 99
    cfg = getattr(transformers, cfg_cls)(**args)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    # random init leaves biases at zero; give them values so that bias slicing is actually exercised
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def copy_in(model, plan) -> None:
    """Reference DirectShare: copy each borrowed unit's slices from the unit it reads, in place.

    A chain reads its root (which the plan guarantees is never itself overwritten); `scale` multiplies
    the copied o slice.

    Written against the plain modules (no SharedProjection), so that it checks sharing independently.
    """
    layout = layout_of(model.config, plan.unit_kind)
    bl = blocks(model)
    pruned = {tuple(p) for p in plan.pruned}
    scales = {(a.layer, a.unit): a.scale for a in plan.assignments}
    with torch.no_grad():
        roots = plan.roots()
        for a in plan.assignments:
            rl, ru = roots[(a.layer, a.unit)]
            for proj in layout.projections():
                dst, src = bl[a.layer].get_submodule(proj.path), bl[rl].get_submodule(proj.path)
                di, si = proj.unit_index(a.unit), proj.unit_index(ru)
                dim = proj.weight_dim()
                w = src.weight.index_select(dim, si)
                if proj.role == "in":
                    w = w * scales[(a.layer, a.unit)]
                dst.weight.index_copy_(dim, di, w)
                if proj.role == "out" and dst.bias is not None:
                    dst.bias[di] = src.bias[si]
        for layer, unit in pruned:
            for proj in layout.projections():
                m = bl[layer].get_submodule(proj.path)
                m.weight.index_fill_(proj.weight_dim(), proj.unit_index(unit), 0.0)
                if proj.role == "out" and m.bias is not None:
                    m.bias[proj.unit_index(unit)] = 0.0
