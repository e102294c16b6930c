"""Applying a plan: `share(model, plan)` restructures a model in place (`headshare.structure`), so that
borrowed units read their root's slices and pruned units are gone, and records the plan in its config.

A plan's fitted weights (unit slices a method refitted) are written into the model first, after a
check that the model holds the weights they were fitted on. Saving and loading: `headshare.checkpoint`.
"""

from __future__ import annotations

from torch import nn

from .arch import layout_of
from .checkpoint import MODELING_FILE, shared_model_class
from .errors import HeadshareError
from .plan import SharePlan
from .structure import (
    BASIS_NAME,
    STORAGE,
    SharedBasis,
    SharedProjection,
    apply_structure,
    check_basis_tensors,
)
from .units import is_unit_key, refuse_shared, weights_fingerprint, write_fitted

# the structure's classes are part of what sharing gives a user
__all__ = ["BASIS_NAME", "SharedBasis", "SharedProjection", "share", "unique_parameters"]

def unique_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) counting every storage once, so tied and shared weights count once."""
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        seen[key] = (p.numel(), p.numel() * p.element_size())
    return sum(n for n, _ in seen.values()), sum(b for _, b in seen.values())


def share(model: nn.Module, plan: SharePlan) -> nn.Module:
    """Apply `plan` to `model` in place and return it; memory drops by the shared units' weights. The attention
    projections are replaced; weights memory-mapped from a checkpoint have their pages released, so tensors
    of the old projections kept elsewhere read the file's values afterwards.

    >>> plan = headshare.make_plan(model, 0.3)     # doctest: +SKIP
    >>> headshare.share(model, plan)              # doctest: +SKIP
    >>> model.save_pretrained("out")              # doctest: +SKIP
    """
    layout = layout_of(model.config, plan.unit_kind)
    refuse_shared(model, "share")
    plan.validate(layout)
    params0, bytes0 = unique_parameters(model)
    if plan.fitted and plan.base_sha1 is not None and weights_fingerprint(model, plan.unit_kind) != plan.base_sha1:
        raise HeadshareError(
            f"this {plan.method!r} plan carries weights fitted on other attention weights than this model's "
            "(their fingerprints differ): applied here it would give a broken model. Make the plan on this "
            "model, or apply it to the model it was made on")
    check_basis_tensors(plan, layout)  # before anything is written: a plan with bases carries their tensors
    write_fitted(model, layout, {k: v for k, v in plan.fitted.items() if is_unit_key(k)})
    apply_structure(model, plan, layout)
    params1, bytes1 = unique_parameters(model)
    base = type(model)
    model.__class__ = shared_model_class(base)
    # a GGUF-loaded model carries a quantizer marker that blocks save_pretrained; the weights are plain now
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.config.quantization_config = None
    record = plan.to_dict()  # the fitted tensors are in the weights now; the record names them
    record.update(base_class=base.__name__, params_original=params0, bytes_original=bytes0,
                  params_shared=params1, bytes_shared=bytes1, storage=STORAGE)
    model.config.headshare = record
    model.config.auto_map = {"AutoModelForCausalLM" if _is_causal_lm(base) else "AutoModel":
                             f"{MODELING_FILE[:-3]}.{model.__class__.__name__}"}
    return model


def _is_causal_lm(cls: type) -> bool:
    return cls.__name__.endswith(("ForCausalLM", "LMHeadModel"))
