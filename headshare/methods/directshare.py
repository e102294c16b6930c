"""The paper's DirectShare, and its data-free variant matched by a symmetry-aligned similarity.

Both use the paper's dynamic selection (`headshare.plan.dynamic_selection`) and copy the source's
weights at scale 1; they differ in the similarity:

- `directshare`: the cosine of the flattened match-function weights (`--metric`, "qk" by default);
- `alignshare`: a similarity that the exact symmetries of attention leave unchanged (RoPE-pair rotations
  of q/k, any invertible map between v and o), so two heads that compute the same function match even
  when their raw weights are nearly orthogonal.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..arch import layout_of
from ..config import check, is_integer
from ..plan import SharePlan, dynamic_selection, new_plan
from ..similarity import METRICS, ModelWeights, similarity_matrix
from ..units import head_weights
from .base import MethodConfig, register_method


@dataclass
class DirectShareConfig(MethodConfig):
    metric: str = "qk"  # the paper's match function: cosine of concat(W_q, W_k)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "metric", self.metric in METRICS, f"one of {', '.join(METRICS)}")


@register_method("directshare", DirectShareConfig, "the paper: qk weight cosine, dynamic selection, copy")
def directshare(model, cfg: DirectShareConfig, tokenizer=None, progress: bool = False, device=None) -> SharePlan:
    """The paper's DirectShare selection: weight cosine of the match function, dynamic strategy."""
    layout = layout_of(model.config, cfg.unit)
    sim = similarity_matrix(ModelWeights(model, cfg.unit), cfg.metric, progress=progress)
    return new_plan(model, "directshare", cfg.ratio, unit_kind=cfg.unit, metric=cfg.metric,
                    assignments=dynamic_selection(sim, layout, cfg.ratio))


def aligned_similarity(model, sketch: int = 256, seed: int = 0, unit: str = "kv") -> torch.Tensor:
    """(N, N) unit similarity that the exact symmetries of attention leave unchanged, from weights alone.

    Raw weight cosines change under transformations that leave the function unchanged; this compares the
    invariants instead, per query head:
    - QK: with RoPE, the logit of a query/key pair is sum_i cos(.) q_i'k_i + sin(.) q_i'J k_i over the
      frequency pairs i (dims i and i + d/2), so the bilinear forms A_i = W_q,i'W_k,i and C_i = W_q,i'J W_k,i
      are the whole function; any rotation (and opposite scaling of q and k) within a pair leaves them alone.
      <A_i, A'_i> and <C_i, C'_i> come from 2 x 2 products.
    - OV: W_o W_v (D x D) is unchanged by W_v -> B W_v, W_o -> W_o B^-1 for any invertible B; compared through
      a seeded Gaussian sketch (W_o W_v S, `sketch` columns), an unbiased estimate of the inner products.
    A head pair scores the mean of its QK and OV cosines; a unit pair the best matching of their query heads
    (permuting a unit's query heads with their o columns is one more symmetry). Unit index = layer*U + unit,
    units of the kind `unit`.
    """
    layout = layout_of(model.config, unit)
    d, g = layout.head_dim, layout.q_heads_per_unit
    q, k, v, o = head_weights(model, layout)
    n = q.shape[0]
    perm = torch.arange(d).view(2, d // 2).T.reshape(-1)  # pair i = dims (i, i + d/2), adjacent
    qp, kp = q[:, perm].view(n, d // 2, 2, -1), k[:, perm].view(n, d // 2, 2, -1)
    qk = torch.empty(n, n)
    for a in range(0, n, 32):  # chunks keep the (chunk, n, d/2, 2, 2) products small
        pq = torch.einsum("aipx,biqx->abipq", qp[a:a + 32], qp)
        pk = torch.einsum("aipx,biqx->abipq", kp[a:a + 32], kp)
        same = (pq * pk).sum((-1, -2))
        turn = pq[..., 1, 1] * pk[..., 0, 0] - pq[..., 1, 0] * pk[..., 0, 1] \
            - pq[..., 0, 1] * pk[..., 1, 0] + pq[..., 0, 0] * pk[..., 1, 1]
        qk[a:a + 32] = (same + turn).sum(-1)
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(q.shape[-1], sketch, generator=gen) / sketch ** 0.5
    ov = torch.einsum("hDd,hdx->hDx", o, v @ s).reshape(n, -1)  # (heads, D * sketch)
    ov = ov @ ov.T

    def cos(m):
        norm = m.diagonal().clamp_min(1e-30).sqrt()
        return m / norm[:, None] / norm[None, :]

    heads = (cos(qk) + cos(ov)) / 2  # (L*H, L*H)
    if layout.query_units:
        return heads
    h = heads.view(layout.units_total, g, layout.units_total, g).permute(0, 2, 1, 3)  # (N, N, g, g)
    best = None
    for p in itertools.permutations(range(g)):
        score = h[:, :, torch.arange(g), torch.tensor(p)].mean(-1)
        best = score if best is None else torch.maximum(best, score)
    return best


@dataclass
class AlignShareConfig(MethodConfig):
    sketch: int = 256  # columns of the Gaussian sketch that compares the OV maps
    seed: int = 0  # of that sketch

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "sketch", is_integer(self.sketch) and self.sketch >= 1, "an integer >= 1")
        check(self, "seed", is_integer(self.seed), "an integer")


@register_method("alignshare", AlignShareConfig, "DirectShare with a symmetry-aligned weight similarity (data-free, copies)")
def alignshare(model, cfg: AlignShareConfig, tokenizer=None, progress: bool = False, device=None) -> SharePlan:
    """The paper's dynamic selection and copy, matched by `aligned_similarity` instead of raw weight cosine."""
    layout = layout_of(model.config, cfg.unit)
    sim = aligned_similarity(model, cfg.sketch, cfg.seed, cfg.unit)
    return new_plan(model, "alignshare", cfg.ratio, unit_kind=cfg.unit, metric="aligned-qk+ov",
                    assignments=dynamic_selection(sim, layout, cfg.ratio),
                    notes={"similarity": "mean of QK (RoPE-pair invariant) and OV (sketched) cosines, best head "
                                         "matching"})
