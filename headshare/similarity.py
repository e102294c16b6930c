"""Weight similarity between attention units: the paper's match functions, computed as blocked matrix products.

Each unit becomes one vector (for the default match function "qk", its W_q and W_k rows flattened),
normalised to length 1, so that all pairwise cosines are one Gram matrix V V^T. The vectors are
read a block of layers at a time, either from a model in memory or straight from the safetensors
shards of a checkpoint, so a checkpoint larger than memory can be analysed: only two blocks are ever
held, and earlier blocks are re-read from disk (cheap: safetensors maps the file) instead of kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .arch import Layout, blocks, checkpoint_key_pattern, layout_of
from .errors import HeadshareError
from .files import atomic_write_text, safetensors_error, safetensors_shapes
from .units import refuse_shared, unit_slices

METRICS: dict[str, tuple[str, ...]] = {
    "q": ("q",),
    "k": ("k",),
    "v": ("v",),
    "qk": ("q", "k"),
    "qkv": ("q", "k", "v"),
}


def metric_parts(metric: str, layout: Layout) -> tuple[str, ...]:
    if metric not in METRICS:
        raise HeadshareError(f"unknown match function {metric!r}; choose one of {', '.join(METRICS)}")
    parts = METRICS[metric]
    if layout.query_units and any(p in ("k", "v") for p in parts):
        # with query-head units (multi-query attention, or unit "query") no unit owns a key/value head
        parts = tuple(p for p in parts if p == "q")
        if not parts:
            raise HeadshareError(f"match function {metric!r} needs per-unit k/v, which query-head units "
                             "(multi-query attention, or unit 'query') lack")
    return parts


class WeightSource:
    """Reads one layer's attention projection weights, from a model or a checkpoint directory."""

    layout: Layout

    def projection_weight(self, layer: int, path: str) -> torch.Tensor:
        raise NotImplementedError

    def unit_vectors(self, layer: int, metric: str = "qk", out: torch.Tensor | None = None) -> torch.Tensor:
        """(units_per_layer, dim) float32 vectors of one layer, not normalised; written into `out` if given."""
        parts = metric_parts(metric, self.layout)
        U = self.layout.units_per_layer
        pieces: dict[str, torch.Tensor] = {}
        for proj in self.layout.projections():
            if proj.role != "out" or not any(n in parts for n, _, _ in proj.parts):
                continue
            for name, t in unit_slices(self.projection_weight(layer, proj.path), proj, U).items():
                pieces[name] = t.reshape(U, -1)
        dim = sum(pieces[p].shape[1] for p in parts)
        if out is None:
            out = torch.empty(U, dim)
        col = 0
        for p in parts:  # one conversion copy per part, straight into place (checkpoints are often fp16)
            n = pieces[p].shape[1]
            out[:, col:col + n].copy_(pieces[p])
            col += n
        return out


class ModelWeights(WeightSource):
    def __init__(self, model: torch.nn.Module, unit: str | None = None):
        refuse_shared(model, "the weight analysis")
        self.layout = layout_of(model.config, unit)
        self._blocks = blocks(model)

    def projection_weight(self, layer: int, path: str) -> torch.Tensor:
        return self._blocks[layer].get_submodule(path).weight.detach()


class CheckpointWeights(WeightSource):
    """Reads projection weights from the safetensors files of a model directory, without the model."""

    def __init__(self, path: str | Path):
        from transformers import AutoConfig

        self.path = Path(path)
        config = AutoConfig.from_pretrained(self.path)
        if getattr(config, "headshare", None):
            raise HeadshareError(f"{self.path} is already shared (a headshare checkpoint); analyze the original model "
                             "it was made from")
        self.layout = layout_of(config)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {self.path}")
        self._where: dict[tuple[int, str], tuple[Path, str]] = {}
        patterns = {p.path: checkpoint_key_pattern(self.layout.model_type, p.path)
                    for p in self.layout.projections()}
        for f in files:
            for key in safetensors_shapes(f):
                for proj, pat in patterns.items():
                    m = pat.search(key)
                    if m:
                        self._where[(int(m.group(1)), proj)] = (f, key)
        missing = [(layer, p) for layer in range(self.layout.num_layers) for p in patterns
                   if (layer, p) not in self._where]
        if missing:
            raise HeadshareError(f"{self.path}: checkpoint lacks attention weights, e.g. layer {missing[0][0]} "
                             f"{missing[0][1]}")

    def projection_weight(self, layer: int, path: str) -> torch.Tensor:
        f, key = self._where[(layer, path)]
        try:
            with safe_open(f, framework="pt") as sf:
                return sf.get_tensor(key)
        except Exception as e:  # a damaged file: one clear line, not the library's traceback
            raise safetensors_error(f, e) from None


def weight_source(model_or_path) -> WeightSource:
    if isinstance(model_or_path, WeightSource):
        return model_or_path
    if isinstance(model_or_path, (str, Path)):
        return CheckpointWeights(model_or_path)
    return ModelWeights(model_or_path)


def _layer_blocks(layout: Layout, dim: int, block_bytes: int) -> list[range]:
    per_layer = layout.units_per_layer * dim * 4
    n = max(1, min(layout.num_layers, block_bytes // max(per_layer, 1)))
    return [range(s, min(s + n, layout.num_layers)) for s in range(0, layout.num_layers, n)]


def _normalised_block(src: WeightSource, layers: range, metric: str, dim: int) -> torch.Tensor:
    U = src.layout.units_per_layer
    v = torch.empty(len(layers) * U, dim)  # filled in place: no second copy of the block
    for i, layer in enumerate(layers):
        src.unit_vectors(layer, metric, out=v[i * U:(i + 1) * U])
    return v.div_(v.norm(dim=1, keepdim=True).clamp_min(1e-30))


def similarity_matrix(model_or_path, metric: str = "qk", block_bytes: int = 2 << 30,
                      progress: bool = True) -> torch.Tensor:
    """Cosine similarity of every pair of units, an (N, N) float32 matrix with N = layers x units.

    Unit (layer, u) has index layer * units_per_layer + u. At most two blocks of `block_bytes`
    of float32 vectors are in memory at once.

    >>> sim = similarity_matrix(model)            # doctest: +SKIP
    >>> sim = similarity_matrix("path/to/model")  # streams the safetensors shards  # doctest: +SKIP
    """
    src = weight_source(model_or_path)
    layout = src.layout
    parts = metric_parts(metric, layout)
    widths = {name: w for p in layout.projections() if p.role == "out" for name, _, w in p.parts}
    dim = sum(widths[p] for p in parts) * layout.hidden_size
    groups = _layer_blocks(layout, dim, block_bytes)
    U, N = layout.units_per_layer, layout.units_total
    sim = torch.empty(N, N)
    pairs = [(i, j) for i in range(len(groups)) for j in range(i + 1)]
    bar = tqdm(total=len(pairs), desc=f"similarity ({metric})", disable=not progress, unit="block")
    for i, gi in enumerate(groups):
        vi = _normalised_block(src, gi, metric, dim)
        si = slice(gi.start * U, gi.stop * U)
        for j in range(i + 1):
            gj = groups[j]
            vj = vi if j == i else _normalised_block(src, gj, metric, dim)
            sj = slice(gj.start * U, gj.stop * U)
            block = vi @ vj.T
            sim[si, sj] = block
            sim[sj, si] = block.T
            del vj
            bar.update()
    bar.close()
    return sim


def best_earlier_matches(sim: torch.Tensor, layout: Layout) -> Iterator[tuple[int, int, int, int, float]]:
    """For every unit of layers >= 1, its most similar unit in any earlier layer.

    Yields (layer, unit, source_layer, source_unit, similarity). Ties go to the smallest
    (source_layer, source_unit), since argmax returns the first maximum.
    """
    U = layout.units_per_layer
    for layer in range(1, layout.num_layers):
        rows = sim[layer * U:(layer + 1) * U, : layer * U]
        best, idx = rows.max(dim=1)
        for u in range(U):
            j = int(idx[u])
            yield layer, u, j // U, j % U, float(best[u])


def analysis(model_or_path, metric: str = "qk", progress: bool = True, matrix_limit: int = 4096) -> dict:
    """The `headshare analyze` result: layout, best earlier match of each unit and (if small) the matrix."""
    src = weight_source(model_or_path)
    sim = similarity_matrix(src, metric, progress=progress)
    layout = src.layout
    out = {
        "metric": metric,
        "layout": layout.to_dict(),
        "unit": layout.describe_unit(),
        "best_matches": [
            {"layer": a, "unit": b, "source_layer": c, "source_unit": d, "similarity": round(s, 6)}
            for a, b, c, d, s in best_earlier_matches(sim, layout)
        ],
    }
    if layout.units_total <= matrix_limit:
        out["matrix"] = [[round(float(x), 5) for x in row] for row in sim]
    return out


def save_analysis(result: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(result, indent=1))
