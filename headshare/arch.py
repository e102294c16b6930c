"""Architecture knowledge: where the attention projections of each model family live, and what a unit is.

Everything headshare knows about a model family is one `ArchSpec` in `ARCHITECTURES`, keyed by
`config.model_type`. The rest of the package only talks about *units* and *projections*:

- A **unit** is the smallest piece of attention that can be shared. With classic multi-head attention
  (K == H) it is exactly the paper's head: one query, key and value head and its slice of the output
  projection. With grouped-query attention (1 < K < H) it is one key/value head together with the
  H/K query heads that read it, because those query heads cannot be moved without their key/value head.
  With multi-query attention (K == 1 < H) it is one query head and its output slice; the single
  key/value head stays with its layer.
- With `unit="query"` (separate q/k/v projections only) a unit is one query head and its o columns on any
  model: the key/value heads stay with their layer, so a grouped-query model has H units per layer
  instead of K (SmolLM2: 270 instead of 90) and a borrowed query head reads its own layer's key/value
  head. A shared model records its unit kind, so `layout_of` on its config finds it again.
- A **projection** is a module whose weight is cut into per-unit slices: along its outputs (q, k, v,
  fused qkv) or along its inputs (o). `ProjSpec.parts` says which part (q, k or v) each slice holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import HeadshareError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family's attention (and MLP), relative to `model.base_model`."""

    layers: str  # the ModuleList of decoder/encoder blocks
    o: str  # output projection, relative to one block
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # one fused projection holding q, k and v (GPT-2's c_attn)
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out) instead of nn.Linear's (out, in)
    rope: bool = False  # rotary position embeddings on q and k, with pairs (i, i + head_dim/2)
    # a gated MLP's input projections (one row each per channel) and its output projection (one column), for
    # the bench's whole-model alternatives; empty where the family has none
    mlp_in: tuple[str, ...] = ()
    mlp_out: str | None = None

    @property
    def attention(self) -> str:
        """Path (relative to a block) of the module that holds both the q/k/v and the o projections."""
        common = []
        for a, b in zip((self.qkv or self.q).split("."), self.o.split("."), strict=False):
            if a != b:
                break
            common.append(a)
        return ".".join(common)


_LLAMA_LIKE = ArchSpec(layers="layers", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                       o="self_attn.o_proj", rope=True, mlp_in=("mlp.gate_proj", "mlp.up_proj"),
                       mlp_out="mlp.down_proj")
_BERT_LIKE = ArchSpec(layers="encoder.layer", q="attention.self.query", k="attention.self.key",
                      v="attention.self.value", o="attention.output.dense")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": replace(_LLAMA_LIKE, mlp_in=(), mlp_out=None),  # experts, no one MLP
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gpt2": ArchSpec(layers="h", qkv="attn.c_attn", o="attn.c_proj", conv1d=True),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
}


class UnsupportedModelError(HeadshareError):
    """A model family or head layout headshare cannot cut into units."""


def arch_spec(model_type: str) -> ArchSpec:
    """The ArchSpec of a model family, or a clear error listing what is supported."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"headshare does not know the attention layout of model_type {model_type!r}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class ProjSpec:
    """One projection of a block and how its weight splits into units.

    `parts` lists (name, offset, width): unit u owns features offset + u*width .. offset + (u+1)*width
    of the projection's outputs (role "out") or inputs (role "in"), for every part.
    """

    path: str
    role: str  # "out" or "in"
    parts: tuple[tuple[str, int, int], ...]
    conv1d: bool

    @property
    def unit_width(self) -> int:
        return sum(w for _, _, w in self.parts)

    def weight_dim(self) -> int:
        """The dimension of the stored weight that the unit slices cut."""
        # nn.Linear is (out, in); Conv1D is (in, out)
        return (0 if self.role == "out" else 1) if not self.conv1d else (1 if self.role == "out" else 0)

    def unit_index(self, unit: int) -> torch.Tensor:
        """Feature indices owned by `unit`, in storage order (part by part)."""
        return torch.cat([torch.arange(off + unit * w, off + (unit + 1) * w) for _, off, w in self.parts])


UNIT_KINDS = ("kv", "query")  # a key/value head with its query heads (the default), or one query head


@dataclass(frozen=True)
class Layout:
    """Head counts of a model, read from its config, and the unit they imply."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    unit_kind: str = "kv"

    def __post_init__(self) -> None:
        if self.unit_kind not in UNIT_KINDS:
            raise HeadshareError(f"unit must be one of {', '.join(UNIT_KINDS)}, got {self.unit_kind!r}")
        if self.unit_kind == "query" and arch_spec(self.model_type).qkv is not None:
            raise UnsupportedModelError(f"unit 'query' needs separate q/k/v projections; {self.model_type!r} "
                                        "fuses them (use the default unit)")

    @property
    def multi_query(self) -> bool:
        return self.num_kv_heads == 1 and self.num_heads > 1

    @property
    def query_units(self) -> bool:
        """Units are single query heads whose key/value heads stay with their layer."""
        return self.multi_query or self.unit_kind == "query"

    @property
    def units_per_layer(self) -> int:
        return self.num_heads if self.query_units else self.num_kv_heads

    @property
    def q_heads_per_unit(self) -> int:
        return 1 if self.query_units else self.num_heads // self.num_kv_heads

    @property
    def kv_heads_per_unit(self) -> int:
        return 0 if self.query_units else 1

    def kv_group(self, unit: int) -> int:
        """The key/value head a unit's query heads read (0 for every unit of a multi-query model)."""
        return unit * self.q_heads_per_unit * self.num_kv_heads // self.num_heads

    @property
    def units_total(self) -> int:
        return self.num_layers * self.units_per_layer

    def describe_unit(self) -> str:
        if self.num_heads == self.num_kv_heads:
            return "one attention head (q, k, v rows and o columns)"
        if self.multi_query:
            return "one query head and its o columns (the single key/value head stays per layer)"
        if self.query_units:
            return "one query head and its o columns (the key/value heads stay with their layer)"
        return (f"one key/value head with its {self.q_heads_per_unit} query heads "
                "(q, k, v rows and o columns)")

    def projections(self) -> list[ProjSpec]:
        """The projections of one block, in a fixed order, with their unit slicing."""
        spec = arch_spec(self.model_type)
        d, gq = self.head_dim, self.q_heads_per_unit
        if spec.qkv is not None:
            if self.num_kv_heads != self.num_heads:
                raise UnsupportedModelError("fused qkv projections are only supported with multi-head attention")
            hd = self.num_heads * d
            qkv = ProjSpec(spec.qkv, "out", (("q", 0, d), ("k", hd, d), ("v", 2 * hd, d)), spec.conv1d)
            return [qkv, ProjSpec(spec.o, "in", (("o", 0, d),), spec.conv1d)]
        projs = [ProjSpec(spec.q, "out", (("q", 0, gq * d),), spec.conv1d)]
        if self.kv_heads_per_unit:
            projs += [ProjSpec(spec.k, "out", (("k", 0, d),), spec.conv1d),
                      ProjSpec(spec.v, "out", (("v", 0, d),), spec.conv1d)]
        projs.append(ProjSpec(spec.o, "in", (("o", 0, gq * d),), spec.conv1d))
        return projs

    def in_projections(self) -> list[ProjSpec]:
        """The projections cut along their outputs (q, k, v or fused qkv): a unit's input side."""
        return [p for p in self.projections() if p.role == "out"]

    def layer_projections(self) -> list[ProjSpec]:
        """Input-side projections that are not cut into units: with query-head units, k and v, each one part
        spanning all key/value heads (they stay with their layer; a shared basis can still carry them)."""
        if not self.query_units:
            return []
        spec, width = arch_spec(self.model_type), self.num_kv_heads * self.head_dim
        return [ProjSpec(spec.k, "out", (("k", 0, width),), spec.conv1d),
                ProjSpec(spec.v, "out", (("v", 0, width),), spec.conv1d)]

    def o_projection(self) -> ProjSpec:
        """The output projection, cut along its inputs."""
        return next(p for p in self.projections() if p.role == "in")

    def unit_params(self, with_bias: dict[str, bool] | None = None) -> int:
        """Parameters one unit owns (weights, plus bias slices of output-sliced projections)."""
        total = 0
        for p in self.projections():
            total += p.unit_width * self.hidden_size
            if p.role == "out" and with_bias and with_bias.get(p.path):
                total += p.unit_width
        return total

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "num_layers": self.num_layers, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_size": self.hidden_size,
                "units_per_layer": self.units_per_layer, "unit_kind": self.unit_kind}


def layout_of(config, unit: str | None = None) -> Layout:
    """Read the attention layout from a transformers config; head_dim is taken from the config when given.

    The unit kind is `unit` if given, else the one a shared model's record names, else "kv": an unshared
    model's config does not say which units a plan cuts, so the code that plans or applies one passes it."""
    model_type = getattr(config, "model_type", None)
    arch_spec(model_type)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if heads % kv:
        raise UnsupportedModelError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if unit is None:
        record = getattr(config, "headshare", None)
        unit = record["layout"].get("unit_kind", "kv") if isinstance(record, dict) and "layout" in record \
            else "kv"
    return Layout(model_type, config.num_hidden_layers, heads, kv, head_dim, hidden, unit)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    spec = arch_spec(model.config.model_type)
    return model.base_model.get_submodule(spec.layers)


def checkpoint_key_pattern(model_type: str, proj_path: str) -> re.Pattern:
    """Regex finding the weight of `proj_path` in a checkpoint's keys; group 1 is the block index.

    Checkpoints differ in their prefixes (model., transformer., bert.), so only the tail is matched.
    """
    spec = arch_spec(model_type)
    return re.compile(rf"(?:^|\.){re.escape(spec.layers)}\.(\d+)\.{re.escape(proj_path)}\.weight$")
