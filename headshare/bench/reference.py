"""The reference model of a benchmark, run once per input and replayed after."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class CachedReference(nn.Module):
    """The reference model, run once per distinct input: later calls replay its logits.

    On the first call with some input_ids the wrapped model runs and the input of its output
    embedding (the final hidden states, tokens x hidden floats) is kept; a repeated call applies only
    the output embedding to them, which gives the very same logits at a small fraction of the cost.
    Models that transform logits after the head (final_logit_softcapping) are always run in full.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.head = model.get_output_embeddings()
        self.cacheable = self.head is not None and getattr(model.config, "final_logit_softcapping", None) is None
        self._hidden: dict[tuple, torch.Tensor] = {}
        self.full_calls = 0

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, **kw):
        from transformers.modeling_outputs import CausalLMOutput

        key = (tuple(input_ids.shape), hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest())
        if self.cacheable and not kw and key in self._hidden:
            return CausalLMOutput(logits=self.head(self._hidden[key]))
        seen = {}
        handle = self.head.register_forward_pre_hook(lambda _m, a: seen.__setitem__("h", a[0].detach())) \
            if self.cacheable else None
        try:
            out = self.model(input_ids=input_ids, **kw)
        finally:
            if handle is not None:
                handle.remove()
        self.full_calls += 1
        h = seen.get("h")
        if self.cacheable and not kw and h is not None and h.shape[:2] == input_ids.shape:
            self._hidden[key] = h
        return out
