"""`headshare.sharing`: `share` on every supported architecture, with key/value and query-head units.

Exact savings and an exact forward (both ways a shared projection computes: one product over a
gathered weight, or one per run), ties that hold through training, and what `share` refuses.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import IDS, TINY, bias_flags, build_tiny_llama, copy_in, outputs
from torch.overrides import TorchFunctionMode

import headshare
import headshare.structure as structure
from headshare.arch import blocks, layout_of
from headshare.files import _file_mappings, release_mapped
from headshare.plan import Assignment, SharePlan, new_plan
from headshare.sharing import SharedProjection, unique_parameters

ARCHS = sorted(TINY)


@pytest.fixture(params=["gathered", "per-run"])
def product(request, monkeypatch):
    """Both forward strategies of a shared projection: one product over a gathered weight, or one per run."""
    monkeypatch.setattr(structure, "GATHER_MIN_TOKENS", 0 if request.param == "gathered" else 10**9)
    monkeypatch.setattr(structure, "GATHER_MAX_RUN", 10**18)  # any run is narrow enough to gather
    return request.param


@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_zero_is_bit_identical(arch, tiny_model):
    model = tiny_model(arch)
    before = outputs(model, IDS)
    headshare.share(model, headshare.make_plan(model, 0.0))
    assert all(isinstance(blocks(model)[0].get_submodule(p.path), SharedProjection)
               for p in layout_of(model.config).projections())
    assert torch.equal(outputs(model, IDS), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_forward_equals_copied_weights_and_savings_are_exact(arch, product, tiny_model):
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    plan = headshare.make_plan(model, 0.5)
    layout = layout_of(model.config)
    assert plan.units_shared == int(0.5 * layout.units_total)
    p0, b0 = headshare.unique_parameters(model)
    headshare.share(model, plan)
    p1, b1 = headshare.unique_parameters(model)
    per_unit = layout.unit_params(bias_flags(reference))
    assert p0 - p1 == plan.units_shared * per_unit
    assert b0 - b1 == plan.units_shared * per_unit * 4  # float32
    copy_in(reference, plan)
    torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=1e-5, atol=1e-6)


def test_chains_read_the_root(product, tiny_model):
    model = tiny_model("llama-gqa")
    plan = new_plan(model, "manual", 0.0, assignments=[Assignment(1, 0, 0, 1), Assignment(2, 1, 1, 0)])
    assert plan.roots() == {(1, 0): (0, 1), (2, 1): (0, 1)}
    reference = copy.deepcopy(model)
    headshare.share(model, plan)
    q0, q2 = blocks(model)[0].self_attn.q_proj, blocks(model)[2].self_attn.q_proj
    assert q2.own == [0]  # layer 2 stores unit 0 only; its unit 1 reads the root (0, 1), not (1, 0)'s copy
    a, b = q0.own_range(1, 0)
    with torch.no_grad():
        effective = q2(torch.eye(q2.in_features)).t()  # identity in: the layer's full q weight out
    assert torch.equal(effective[b - a:], q0.weight[a:b])
    copy_in(reference, plan)
    torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=1e-5, atol=1e-6)


def test_scaled_and_pruned_units_match_reference(product, tiny_model):
    model = tiny_model("qwen2-bias")
    reference = copy.deepcopy(model)
    plan = new_plan(model, "manual", 0.0, assignments=[Assignment(1, 0, 0, 1, scale=0.5),
                                                       Assignment(2, 1, 1, 0, scale=-2.0)],
                    pruned=[(1, 1), (2, 0)])
    headshare.share(model, plan)
    copy_in(reference, plan)
    torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=1e-5, atol=1e-6)


class _LinearWeights(TorchFunctionMode):
    """Records the weight tensors that F.linear is called with."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self.weights.append(args[1] if len(args) > 1 else kwargs["weight"])
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch,unit", [(a, "kv") for a in ARCHS] + [("llama-gqa", "query"), ("qwen2-bias", "query")])
def test_a_layer_that_only_prunes_computes_on_its_stored_weight(arch, unit, product, monkeypatch, tiny_model):
    # a layer whose units are kept or pruned, none borrowed, runs one product over its stored weight (no
    # gathered copy, no product with the pruned units' zeros), whatever the gather settings
    model = tiny_model(arch)
    layout = layout_of(model.config, unit)
    U = layout.units_per_layer
    pruned = [(1, 0), (2, U - 1)] if U > 1 else [(1, 0)]
    plan = new_plan(model, "manual", 0.0, unit_kind=unit, pruned=pruned)
    reference = copy.deepcopy(model)
    headshare.share(model, plan)
    copy_in(reference, plan)
    torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=1e-5, atol=1e-6)
    if U == 1:
        return  # the pruned layer keeps nothing: no product at all
    for layer, _ in pruned:
        for proj in layout.projections():
            mod = blocks(model)[layer].get_submodule(proj.path)
            assert mod._own_runs is not None, proj.path
            assert mod.weight.shape[mod.dim] == (U - 1) * sum(w for _, _, w in proj.parts)
            x = torch.randn(2, 20, mod.in_features)
            with monkeypatch.context() as m, _LinearWeights() as lin, torch.no_grad():
                m.setattr(SharedProjection, "_gathered", lambda self: pytest.fail("gathered a copy"))
                y = mod(x)
            if not mod.xw:  # F.linear got the stored weight itself, not a copy
                assert [w.data_ptr() for w in lin.weights] == [mod.weight.data_ptr()]
            # the same as the dense projection with the pruned units' slices zeroed
            with torch.no_grad():
                want = blocks(reference)[layer].get_submodule(proj.path)(x)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_shared_weights_stay_tied_through_training(monkeypatch, tiny_model):
    # one product per run: the forward then reads each unit's rows where they are stored, no gathered copy
    monkeypatch.setattr(structure, "GATHER_MIN_TOKENS", 10**9)
    model = tiny_model("llama-gqa").train()  # 2 units per layer; q rows of a unit: 2 heads x 8
    plan = new_plan(model, "manual", 0.0, assignments=[Assignment(2, 0, 0, 1)])
    headshare.share(model, plan)
    q0 = blocks(model)[0].self_attn.q_proj
    q2 = blocks(model)[2].self_attn.q_proj
    a, b = q0.own_range(1, 0)  # root unit (0, 1)'s q rows in layer 0's storage
    width = b - a
    before = q0.weight.detach()[a:b].clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(q0.weight.detach()[a:b], before), "training did not move the root"
    # layer 2 stores only its own unit's rows: no copy of the borrowed ones
    assert q2.weight.shape[0] == width and q2.own == [1]
    x = torch.eye(q2.in_features)

    def borrowed_rows() -> torch.Tensor:
        """Layer 2's effective q weight for unit 0, read through its forward (identity in: W^T out)."""
        with torch.no_grad():
            return q2(x).t()[:width]

    # after training: the borrower computes with the root's trained rows, exactly
    assert torch.equal(borrowed_rows(), q0.weight.detach()[a:b])
    own = q2(x).t()[width:].detach().clone()
    with torch.no_grad():
        q0.weight[a:b] += 1.0  # an in-place edit of the root ...
    assert torch.equal(borrowed_rows(), q0.weight.detach()[a:b])  # ... is what the borrower computes with
    assert torch.equal(q2(x).t()[width:].detach(), own)  # and layer 2's own unit is untouched by it
    # the weight the borrowed run multiplies with is a view into the root's storage, at the root's rows
    with _LinearWeights() as seen, torch.no_grad():
        q2(x)
    row_bytes = q0.weight.shape[1] * q0.weight.element_size()
    start = q0.weight.data_ptr() + a * row_bytes
    views = [w for w in seen.weights if w.untyped_storage().data_ptr() == q0.weight.untyped_storage().data_ptr()]
    assert [(w.data_ptr(), tuple(w.shape)) for w in views] == [(start, (width, q0.weight.shape[1]))]


def test_wide_runs_are_not_gathered_however_many_tokens(monkeypatch, tiny_model):
    # runs averaging GATHER_MAX_RUN weight elements or more are products on their own, prefill included
    model = tiny_model("llama-gqa")
    headshare.share(model, new_plan(model, "manual", 0.0, assignments=[Assignment(2, 0, 0, 1)]))
    gathered = outputs(model, IDS)
    monkeypatch.setattr(structure, "GATHER_MAX_RUN", 0)
    monkeypatch.setattr(SharedProjection, "_gathered", lambda self: pytest.fail("gathered a wide-run weight"))
    assert torch.allclose(outputs(model, IDS), gathered, rtol=0, atol=1e-5)


def test_o_weights_are_stored_input_major(monkeypatch, tiny_model):
    # a unit's o columns are contiguous rows of the stored weight, so a decoding step reads a borrowed run in
    # one sweep instead of a strided column slice (structure.STORAGE 2)
    monkeypatch.setattr(structure, "GATHER_MIN_TOKENS", 10**9)
    model = tiny_model("llama-gqa")
    o_before = [blocks(model)[i].self_attn.o_proj.weight.detach().clone() for i in (0, 1, 2)]
    headshare.share(model, new_plan(model, "manual", 0.0, assignments=[Assignment(2, 0, 0, 0)]))
    o0, o1, o2 = (blocks(model)[i].self_attn.o_proj for i in (0, 1, 2))
    width = o2.weight.shape[0]
    assert o0.input_major and o2.input_major and not o1.input_major
    assert o0.weight.shape == (2 * width, o0.out_features) and o0.weight.is_contiguous()
    assert torch.equal(o0.weight, o_before[0].T)  # the lender owns every unit: the original weight, transposed
    assert torch.equal(o2.weight, o_before[2][:, width:].T)  # the borrower keeps unit 1's columns alone
    # a layer the plan does not touch keeps the original orientation, so it computes exactly as before
    assert torch.equal(o1.weight, o_before[1])


def test_sharing_twice_is_refused(tiny_model):
    model = tiny_model("llama-gqa")
    headshare.share(model, headshare.make_plan(model, 0.3))
    with pytest.raises(ValueError, match="already shared"):
        headshare.share(model, SharePlan.from_dict(model.config.headshare))


def test_shared_models_are_refused_for_planning_and_analysis(tmp_path, tiny_model):
    from headshare.similarity import similarity_matrix

    model = tiny_model("llama-gqa")
    headshare.share(model, headshare.make_plan(model, 0.3))
    with pytest.raises(ValueError, match="already shared"):
        headshare.make_plan(model, 0.3)
    with pytest.raises(ValueError, match="already shared"):
        similarity_matrix(model, progress=False)
    model.save_pretrained(tmp_path / "s")
    with pytest.raises(ValueError, match="already shared"):
        similarity_matrix(str(tmp_path / "s"), progress=False)
    loaded = headshare.load(tmp_path / "s")
    with pytest.raises(ValueError, match="already shared"):
        headshare.make_plan(loaded, 0.3, "random")


def test_fitted_slices_are_written_before_tying_and_only_on_their_weights(tiny_model):
    from headshare.units import read_fitted, weights_fingerprint

    model = tiny_model("qwen2-bias")
    layout = layout_of(model.config)
    o = layout.o_projection()
    # unit (1, 0) keeps its place with refitted o columns; (2, 1) borrows it, so it reads them too
    fitted = {k: 2 * v - 0.1 for k, v in read_fitted(model, [(1, 0)], [o.path]).items()}
    assert list(fitted) == [f"1.{o.path}.unit0"]
    plan = new_plan(model, "manual", 0.0, assignments=[Assignment(2, 1, 1, 0, scale=0.5)], fitted=fitted,
                    base_sha1=weights_fingerprint(model))
    other = tiny_model("qwen2-bias", seed=1)
    kept = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="fitted on other attention weights"):
        headshare.share(other, plan)
    assert all(torch.equal(v, kept[k]) for k, v in other.state_dict().items())  # refused before any write
    reference = copy.deepcopy(model)
    headshare.share(model, plan)
    with torch.no_grad():
        w = blocks(reference)[1].get_submodule(o.path).weight
        w[:, o.unit_index(0)] = fitted[f"1.{o.path}.unit0"]
    copy_in(reference, plan)
    torch.testing.assert_close(outputs(model, IDS), outputs(reference, IDS), rtol=1e-5, atol=1e-6)
    assert model.config.headshare["fitted"] == [f"1.{o.path}.unit0"]


def test_plan_for_another_model_is_refused(tiny_model):
    small = tiny_model("llama-gqa")
    plan = headshare.make_plan(small, 0.3)
    other = tiny_model("llama-mha")
    with pytest.raises(ValueError, match="does not fit"):
        headshare.share(other, plan)


# -- query-head units: one query head and its o columns per unit, key/value heads kept per layer ---------

def test_ratio_zero_with_query_units_is_bit_identical(tiny_model):
    model = tiny_model("llama-gqa")
    before = outputs(model, IDS)
    headshare.share(model, headshare.make_plan(model, 0.0, unit="query"))
    assert torch.equal(outputs(model, IDS), before)


@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mha", "qwen2-bias", "qwen3-norm", "gemma"])
@pytest.mark.parametrize("method", ["directshare", "random", "layerwise"])
def test_forward_equals_copied_query_heads_and_savings_are_exact(arch, method, tiny_model):
    model = tiny_model(arch)
    plan = headshare.make_plan(model, 0.5, method, unit="query")
    layout = layout_of(model.config, "query")
    assert plan.unit_kind == "query" and plan.layout["units_per_layer"] == model.config.num_attention_heads
    reference = copy.deepcopy(model)
    copy_in(reference, plan)
    shared = copy.deepcopy(model)
    params0, bytes0 = unique_parameters(shared)
    headshare.share(shared, plan)
    params1, bytes1 = unique_parameters(shared)
    q_bias = blocks(model)[0].self_attn.q_proj.bias is not None
    per_unit = layout.unit_params({"self_attn.q_proj": q_bias})
    assert params0 - params1 == plan.units_removed * per_unit == 6 * per_unit
    assert bytes0 - bytes1 == 4 * (params0 - params1)
    assert torch.equal(outputs(shared, IDS), outputs(reference, IDS))
    # k and v are untouched modules: every layer keeps its key/value heads
    for a, b in zip(blocks(shared), blocks(model), strict=True):
        assert torch.equal(a.self_attn.k_proj.weight, b.self_attn.k_proj.weight)


# -- memory-mapped weights ------------------------------------------------------------------------------------

def _resident_kb(ptr: int) -> int:
    """Resident kB of the memory mapping that holds address `ptr` (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {ptr:#x}")


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")


@linux_only
def test_release_mapped_drops_a_mapped_tensors_pages_and_leaves_other_memory_alone(tmp_path):
    path = tmp_path / "w.bin"
    torch.arange(1 << 20, dtype=torch.float32).numpy().tofile(path)  # 4 MB
    t = torch.from_file(str(path), shared=False, size=1 << 20, dtype=torch.float32)
    t[:] += 1  # copied on write: private pages that differ from the file
    before = _resident_kb(t.data_ptr())
    anon = torch.ones(1 << 20)
    assert release_mapped([anon]) == 0 and torch.equal(anon, torch.ones(1 << 20))
    assert release_mapped([t[1024:]]) >= 4 * 1024 * 1024 - 4096 - 2 * 4096  # whole pages inside the view only
    assert _resident_kb(t.data_ptr()) <= before - 4000
    assert float(t[0]) == 1.0  # the page that holds t[0] is partly outside the view: kept, with its write
    assert torch.equal(t[2048:], torch.arange(2048, 1 << 20, dtype=torch.float32))  # read back from the file


@linux_only
def test_sharing_a_memory_mapped_checkpoint_releases_what_it_replaced_and_computes_the_same(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    build_tiny_llama(0, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
                     num_key_value_heads=4).save_pretrained(tmp_path)
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    q = blocks(mapped)[1].self_attn.q_proj.weight
    assert any(lo <= q.data_ptr() < hi for lo, hi in _file_mappings()), "transformers no longer maps the weights"
    with torch.no_grad():  # every weight changed in place: what is kept must be the model's, not the file's
        for p in mapped.parameters():
            p.mul_(1.5)
    in_memory = copy.deepcopy(mapped)
    plan = headshare.make_plan(in_memory, 0.3)
    released = []
    monkeypatch.setattr(structure, "release_mapped", lambda ts: released.append(release_mapped(ts)) or released[-1])
    headshare.share(in_memory, plan)
    headshare.share(mapped, plan)
    attention = 3 * sum(p.numel() * p.element_size() for p in blocks(in_memory)[0].self_attn.parameters())
    assert released[0] == 0  # the copy is not mapped from a file
    assert released[1] >= attention * 0.9
    assert torch.equal(outputs(mapped, IDS), outputs(in_memory, IDS))
