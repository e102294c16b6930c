"""`headshare.methods.actshare`: a duplicate borrowed at scale 1; never worse than pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import corpus_ids, duplicate_unit, outputs

import headshare
from headshare.arch import blocks, layout_of
from headshare.methods.calibration import calibration_ids
from headshare.plan import SharePlan


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-bias"])
def test_duplicate_source_gets_scale_one_and_logits_do_not_move(arch, tiny_tokenizer, tiny_model, tiny_plan):
    model = tiny_model(arch)  # 3 layers x 2 units; ratio 0.2 -> exactly one unit
    duplicate_unit(model, (1, 0), (0, 1))
    ids = corpus_ids(tiny_tokenizer)
    before = outputs(model, ids)
    plan = tiny_plan(model, 0.2, "actshare")
    (a,) = plan.assignments
    assert (a.layer, a.unit, a.source_layer, a.source_unit) == (1, 0, 0, 1)
    assert abs(a.scale - 1.0) < 1e-4
    headshare.share(model, plan)
    torch.testing.assert_close(outputs(model, ids), before, atol=1e-5, rtol=1e-5)


def _layer_errors(model, reference, ids) -> list[float]:
    """Per layer: sum_t ||attn_out_t - attn_out_ref_t||^2 / ||h_t + attn_out_ref_t||^2, every layer fed the
    reference model's own inputs (the layer-local objective of the scaled-sharing fit), written independently
    of headshare.methods with plain hooks."""
    layout = layout_of(reference.config)
    apath = layout.projections()[0].path.rpartition(".")[0]
    seen = {}
    hooks = []
    for i, b in enumerate(blocks(reference)):
        hooks.append(b.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(("h", i), a[0]),
                                                 with_kwargs=True))
        hooks.append(b.get_submodule(apath).register_forward_hook(
            lambda m, a, k, out, i=i: seen.__setitem__(("attn", i), (k, out[0])), with_kwargs=True))
    with torch.no_grad():
        reference(ids, use_cache=False)  # a cache in the captured kwargs would grow when the call is replayed
    for h in hooks:
        h.remove()
    errs = []
    with torch.no_grad():
        for i, b in enumerate(blocks(model)):
            kwargs, ref = seen[("attn", i)]
            got = b.get_submodule(apath)(**kwargs)[0]
            w = 1.0 / (seen[("h", i)] + ref).pow(2).sum(-1)
            errs.append(float(((got - ref).pow(2).sum(-1) * w).sum()))
    return errs


def test_scaled_sharing_never_worse_than_pruning_the_same_units(tiny_tokenizer, calib_file, tiny_model,
                                                                tiny_plan):
    original = tiny_model("llama-gqa", seed=3)  # 3 layers x 2 units; 0.5 -> 3 units, so a layer loses both
    plan = tiny_plan(copy.deepcopy(original), 0.5, "actshare")
    pruned = SharePlan.from_dict({**plan.to_dict(), "assignments": [],
                                  "pruned": [[a.layer, a.unit] for a in plan.assignments]})
    shared_m = headshare.share(copy.deepcopy(original), plan)
    pruned_m = headshare.share(copy.deepcopy(original), pruned)
    ids = calibration_ids(original, tiny_tokenizer, calib_file, 128)
    err_s, err_p = _layer_errors(shared_m, original, ids), _layer_errors(pruned_m, original, ids)
    assert any(a.scale != 0 for a in plan.assignments)
    for s, p in zip(err_s, err_p, strict=True):
        assert s <= p * (1 + 1e-5) + 1e-9
    assert sum(err_s) < sum(err_p)
