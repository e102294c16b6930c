"""`headshare.methods.calibration`: block by block, each layer sees what the whole model computes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS

import headshare
from headshare.arch import blocks, layout_of
from headshare.errors import HeadshareError
from headshare.methods import calibration
from headshare.methods.calibration import (
    Stash,
    borrowed_z,
    calibration_ids,
    capture,
    held_out_loss,
    plan_applied,
    source_key,
    stream,
    walk,
)
from headshare.plan import Assignment, SharePlan, new_plan
from headshare.units import unit_z


def _ids(tok, n: int = 2, t: int = 24) -> torch.Tensor:
    ids = tok(" ".join(TINY_CORPUS * 3))["input_ids"][: n * t]
    return torch.tensor(ids).view(n, t)


def _reference(model, ids) -> dict:
    """Every block's input and o-projection input/output from one plain forward of the whole model."""
    layout = layout_of(model.config)
    seen, hooks = {}, []
    for i, b in enumerate(blocks(model)):
        hooks.append(b.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(("h", i), k.get("hidden_states", a[0] if a else None)),
            with_kwargs=True))
        hooks.append(b.get_submodule(layout.o_projection().path).register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("o", i), (a[0], out))))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-bias", "gpt2", "gemma"])
def test_walk_sees_what_the_whole_model_computes(arch, tiny_tokenizer, tiny_model):
    model = tiny_model(arch)
    ids = _ids(tiny_tokenizer)
    before = copy.deepcopy(model.state_dict())
    ref = _reference(model, ids)
    n = 0
    for layer, d in walk(model, ids):
        assert torch.equal(d.h, ref[("h", layer)])
        z, a = ref[("o", layer)]
        assert torch.equal(d.z, z.reshape(-1, z.shape[-1])) and torch.equal(d.a, a.reshape(-1, a.shape[-1]))
        n += 1
    assert n == layout_of(model.config).num_layers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-bias", "gemma"])
def test_attention_z_replays_fixed_projections_until_their_weights_change(arch, tiny_tokenizer, tiny_model,
                                                                           monkeypatch):
    """`attention_z` stops at the o projection's input (the o product is never run) and gives k and v again
    from the first call while their weights are unchanged: the same z as computing them, a changed q weight
    seen, and an in-place change of k (or a new k tensor) computed anew."""
    model = tiny_model(arch)
    layout = layout_of(model.config, "query")
    fixed = tuple(p.path for p in layout.layer_projections())
    block = blocks(model)[0]
    q, k = (block.get_submodule(p) for p in (layout.in_projections()[0].path, fixed[0]))
    o = block.get_submodule(layout.o_projection().path)
    calls = {"o": 0, "k": 0}
    o.register_forward_hook(lambda *_: calls.__setitem__("o", calls["o"] + 1))
    linear = torch.nn.Linear.forward

    def counted(self, x):  # k's products actually computed (a replay runs none)
        calls["k"] += self is k
        return linear(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    for layer, d in walk(model, _ids(tiny_tokenizer, n=4, t=16), batch_tokens=32):
        if layer:
            continue
        assert len(d.attn_calls) == 2
        calls.update(o=0, k=0)
        assert torch.equal(d.attention_z(block, layout, fixed), d.z) and calls == {"o": 0, "k": 2}
        assert torch.equal(d.attention_z(block, layout, fixed), d.z) and calls["k"] == 2  # replayed
        with torch.no_grad():
            q.weight.mul_(0.5)
            moved = d.attention_z(block, layout, fixed)
            assert calls["k"] == 2 and not torch.equal(moved, d.z)
            assert torch.equal(moved, d.attention_z(block, layout)) and calls["k"] == 4  # k and v run again
            q.weight.mul_(2.0)
            k.weight.mul_(0.5)  # in place: the replay sees the new version
            assert not torch.equal(d.attention_z(block, layout, fixed), d.z) and calls["k"] == 6
            k.weight.mul_(2.0)
            assert torch.equal(d.attention_z(block, layout, fixed), d.z) and calls["k"] == 8
        assert "forward" not in k.__dict__  # the module's own forward is back


def test_layers_with_their_own_calls_get_them(tiny_tokenizer, tiny_model):
    """Gemma 3 alternates sliding-window and global layers, each with its own mask and rotary embedding:
    each block must be replayed with its own call, not the first block's."""
    model = tiny_model("gemma3-sliding")
    ids = _ids(tiny_tokenizer)
    ref = _reference(model, ids)
    for layer, d in walk(model, ids):
        assert torch.equal(d.h, ref[("h", layer)]), layer
        assert torch.equal(d.a, ref[("o", layer)][1].reshape(d.a.shape)), layer


def test_micro_batches_give_the_same_layer_data(tiny_tokenizer, tiny_model):
    model = tiny_model("llama-gqa")
    ids = _ids(tiny_tokenizer, n=4, t=16)
    whole = [d for _, d in walk(model, ids)]
    parts = [d for _, d in walk(model, ids, batch_tokens=16)]  # one sequence per block call
    for a, b in zip(whole, parts, strict=True):
        assert len(b.calls) == 4 and len(a.calls) == 1
        torch.testing.assert_close(a.z, b.z)
        torch.testing.assert_close(a.out, b.out)
        torch.testing.assert_close(a.x, b.x)


def test_a_plan_made_through_micro_batches_is_the_same(tiny_tokenizer, calib_file, monkeypatch, tiny_model):
    from headshare.methods import calibration

    model = tiny_model("llama-mha")
    want = headshare.make_plan(model, 0.5, "fitprune", tokenizer=tiny_tokenizer, calib=calib_file, calib_tokens=128)
    monkeypatch.setattr(calibration, "BATCH_TOKENS", 16)
    got = headshare.make_plan(model, 0.5, "fitprune", tokenizer=tiny_tokenizer, calib=calib_file, calib_tokens=128)
    assert got.pruned == want.pruned
    for k in want.fitted:
        torch.testing.assert_close(got.fitted[k], want.fitted[k], rtol=1e-4, atol=1e-6)


def test_explicit_cpu_device_is_the_model_device(tiny_tokenizer, calib_file, tiny_model):
    model = tiny_model("llama-gqa")
    kw = dict(tokenizer=tiny_tokenizer, calib=calib_file, calib_tokens=128)
    a = headshare.make_plan(model, 0.5, "basisshare", **kw)
    b = headshare.make_plan(model, 0.5, "basisshare", device="cpu", **kw)
    assert a.pruned == b.pruned and a.bases == b.bases
    assert all(torch.equal(a.fitted[k], b.fitted[k]) for k in a.fitted)


@pytest.mark.parametrize("native", [False, True], ids=["cpu-float32", "cpu-amx-bf16"])
@pytest.mark.parametrize("method", ["prune", "fitprune", "basisshare", "choiceshare"])
def test_bfloat16_model_gives_the_plan_float32_gives(method, native, tiny_tokenizer, calib_file, tiny_model,
                                                     monkeypatch):
    """Statistics accumulate in float32/float64 whatever the model's dtype, so a bf16 copy of a model chooses
    the same units (the fitted tensors differ by bf16 rounding only), whether its blocks compute in float32
    (a CPU without AMX) or in bf16 (a CPU with AMX, as on a GPU)."""
    monkeypatch.setattr(calibration, "native_half", lambda dtype: native)
    model = tiny_model("llama-mha", seed=1)
    kw = dict(tokenizer=tiny_tokenizer, calib=calib_file, calib_tokens=128)
    fp32 = headshare.make_plan(model, 0.5, method, **kw)
    bf16 = headshare.make_plan(copy.deepcopy(model).to(torch.bfloat16), 0.5, method, **kw)
    assert bf16.pruned == fp32.pruned and bf16.bases == fp32.bases
    assert sorted(bf16.fitted) == sorted(fp32.fitted)
    for k, v in fp32.fitted.items():
        assert bf16.fitted[k].dtype == torch.bfloat16
        err = (bf16.fitted[k].float() - v).norm() / v.norm().clamp_min(1e-12)
        assert err < 0.1, (k, float(err))


@pytest.mark.parametrize("native", [False, True], ids=["cpu-float32", "cpu-amx-bf16"])
def test_half_precision_blocks_compute_on_the_cpu_and_keep_their_tensors(native, tiny_model, monkeypatch):
    """On a CPU without AMX a bf16 block computes in float32 during its turn (bf16 products are slow there),
    with AMX in bf16; afterwards it holds its own bf16 tensors again, the same storage: nothing rounded, a
    memory-mapped weight stays mapped."""
    monkeypatch.setattr(calibration, "native_half", lambda dtype: native)
    turn = torch.bfloat16 if native else torch.float32
    model = tiny_model("llama-gqa").to(torch.bfloat16)
    before = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    ids = torch.randint(4, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    for layer, d in walk(model, ids):
        block = blocks(model)[layer]
        assert {p.dtype for p in block.parameters()} == {turn}
        assert d.z.dtype == d.out.dtype == turn
        assert {p.dtype for p in blocks(model)[(layer + 1) % 3].parameters()} == {torch.bfloat16}
    assert {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()} == before
    # the stream agrees with the bf16 model's own forward (whose last hidden state is after the final norm) up
    # to bf16 rounding
    ref = model(ids, output_hidden_states=True).hidden_states[-1]
    got = model.model.norm(list(walk(model, ids))[-1][1].out.to(torch.bfloat16))
    assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 0.05


def test_native_half_reads_the_cpu_probe_and_is_false_without_one(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert calibration.native_half(torch.bfloat16) is True
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert calibration.native_half(torch.bfloat16) is False  # an older torch without the probe: float32
    assert calibration.native_half(torch.float32) is False


def test_a_model_dispatched_by_accelerate_is_computed_where_it_was_put(tiny_tokenizer, calib_file,
                                                                       tiny_model):
    from accelerate import dispatch_model

    model = tiny_model("llama-gqa")
    kw = dict(tokenizer=tiny_tokenizer, calib=calib_file, calib_tokens=128)
    want = headshare.make_plan(copy.deepcopy(model), 0.5, "fitprune", **kw)
    dispatched = dispatch_model(model, device_map={"": "cpu"})
    got = headshare.make_plan(dispatched, 0.5, "fitprune", **kw)
    assert got.pruned == want.pruned
    assert all(torch.equal(got.fitted[k], want.fitted[k]) for k in want.fitted)


def _plans(model, tok, calib, query: bool) -> list[SharePlan]:
    layout = layout_of(model.config)
    kw = dict(tokenizer=tok, calib=calib, calib_tokens=128)
    borrow = SharePlan.from_dict({"layout": layout.to_dict(), "method": "manual", "ratio": 0.3,
                                  "assignments": [{"layer": 2, "unit": 0, "source_layer": 0, "source_unit": 1,
                                                   "scale": 0.5},
                                                  {"layer": 1, "unit": 1, "source_layer": 0, "source_unit": 1}],
                                  "pruned": [[2, 1]]})
    plans = [borrow, headshare.make_plan(model, 0.5, "fitshare", min_gain=0.0, **kw),
             headshare.make_plan(model, 0.5, "basisshare", **kw)]
    if query:  # query-head units need separate q/k/v projections
        plans.append(headshare.make_plan(model, 0.5, "choiceshare", unit="query", **kw))
    return plans


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-bias", "gpt2"])
def test_a_plan_applied_block_by_block_computes_what_the_shared_model_does(arch, tiny_tokenizer, calib_file,
                                                                           tiny_model):
    model = tiny_model(arch)
    ids = _ids(tiny_tokenizer)
    before = copy.deepcopy(model.state_dict())
    for plan in _plans(model, tiny_tokenizer, calib_file, query=arch != "gpt2"):
        shared = headshare.share(copy.deepcopy(model), plan)
        with torch.no_grad():
            want = shared.base_model(ids, use_cache=False).last_hidden_state
        got = stream(model, ids, edit=lambda layer, plan=plan: plan_applied(model, plan, layer))
        norm = model.base_model.get_submodule("norm" if arch != "gpt2" else "ln_f")
        with torch.no_grad():
            torch.testing.assert_close(norm(got), want, rtol=1e-4, atol=1e-5)
        assert held_out_loss(model, ids, plan) == pytest.approx(held_out_loss(shared, ids), abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "plan_applied left edits"


def test_held_out_loss_is_the_models_own_loss(tiny_tokenizer, tiny_model):
    model = tiny_model("llama-gqa")
    ids = _ids(tiny_tokenizer, n=3, t=16)
    with torch.no_grad():
        want = sum(float(model(input_ids=r[None], labels=r[None]).loss) for r in ids) / 3
    assert held_out_loss(model, ids) == pytest.approx(want, rel=1e-6)


def test_calibration_ids_need_a_tokenizer(calib_file, tiny_model):
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_ids(tiny_model("llama-gqa"), None, calib_file, 64)


def test_walk_refuses_a_shared_model(tiny_tokenizer, tiny_model):
    model = tiny_model("llama-gqa")
    headshare.share(model, headshare.make_plan(model, 0.3))
    with pytest.raises(ValueError, match="already shared"):
        next(walk(model, _ids(tiny_tokenizer)))


def test_borrowed_outputs_are_what_share_computes(tiny_tokenizer, calib_file, tiny_model):
    model = tiny_model("llama-gqa")
    layout = layout_of(model.config)
    ids = calibration_ids(model, tiny_tokenizer, calib_file, 128)
    data = capture(model, ids)
    plan = SharePlan.from_dict({"layout": layout.to_dict(), "method": "manual", "ratio": 0.3,
                                "assignments": [{"layer": 2, "unit": 0, "source_layer": 0, "source_unit": 1},
                                                {"layer": 2, "unit": 1, "source_layer": 1, "source_unit": 1}]})
    want = borrowed_z(model, data[2], layout, 2, [(0, 1), (1, 1)])
    shared = headshare.share(copy.deepcopy(model), plan)
    got = {}
    o = blocks(shared)[2].get_submodule(layout.projections()[-1].path)
    handle = o.register_forward_pre_hook(lambda m, a: got.__setitem__("z", a[0]))
    args, kwargs = data[2].attn_call
    with torch.no_grad():
        blocks(shared)[2].get_submodule("self_attn")(*args, **kwargs)
    handle.remove()
    z = got["z"].reshape(-1, got["z"].shape[-1])
    torch.testing.assert_close(unit_z(z, layout, 0), want[(0, 1)])
    torch.testing.assert_close(unit_z(z, layout, 1), want[(1, 1)])


def test_borrowed_query_head_attends_with_the_key_value_head_of_its_slot(tiny_llama):
    """The features a calibrated method fits are those `share` computes: a query head borrowed into a slot
    of key/value head g attends with this layer's head g."""
    model = tiny_llama(num_hidden_layers=3)  # 4 query heads, 2 key/value heads
    ids = torch.randint(4, 50, (1, 16), generator=torch.Generator().manual_seed(0))
    layout = layout_of(model.config, "query")
    data = capture(model, ids)
    keys = [source_key(layout, (0, 1), 3), source_key(layout, (0, 1), 0)]
    assert keys == [(0, 1, 1), (0, 1, 0)]
    z = borrowed_z(model, data[2], layout, 2, keys)
    for unit, key in ((3, keys[0]), (0, keys[1])):
        plan = new_plan(model, "manual", 0.0, unit_kind="query", assignments=[Assignment(2, unit, 0, 1)])
        assert plan.unit_kind == "query"
        shared = headshare.share(copy.deepcopy(model), plan)
        got = {}
        o = blocks(shared)[2].self_attn.o_proj
        h = o.register_forward_pre_hook(lambda _m, args, got=got: got.__setitem__("z", args[0]))
        with torch.no_grad():
            shared(ids)
        h.remove()
        want = got["z"].reshape(-1, 32)[:, unit * 8:(unit + 1) * 8]
        assert torch.allclose(z[key].float(), want, atol=1e-5)



def test_a_mix_of_sources_gives_each_an_equal_share(tiny_llama, tiny_tokenizer, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(TINY_CORPUS * 40))
    b.write_text(" ".join(reversed(TINY_CORPUS * 40)))
    model = tiny_llama()
    mix = calibration_ids(model, tiny_tokenizer, f"{a}+{b}", 256, 64)
    alone_a = calibration_ids(model, tiny_tokenizer, str(a), 128, 64)
    alone_b = calibration_ids(model, tiny_tokenizer, str(b), 128, 64)
    assert mix.shape == (4, 64) and torch.equal(mix, torch.cat([alone_a, alone_b]))
    with pytest.raises(HeadshareError, match="empty source"):
        calibration_ids(model, tiny_tokenizer, f"{a}+ ", 256)
    (tmp_path / "short.txt").write_text("the sky is blue .")
    with pytest.raises(HeadshareError, match="'.*short.txt' has 5 tokens, fewer than one block of 64"):
        calibration_ids(model, tiny_tokenizer, f"{a}+{tmp_path / 'short.txt'}", 256, 64)


def test_stash_reads_back_what_it_set_aside_and_leaves_nothing_on_disk():
    a = torch.randn(6, 5, dtype=torch.float64)
    with Stash() as stash:
        stash[("gram", 0)] = (a, a.T)  # a transposed view comes back with its strides (products round alike)
        stash[("gram", 1)] = (a[:2],)
        where = Path(stash._dir.name)
        assert len(list(where.iterdir())) == 2
        back = stash[("gram", 0)]
        assert torch.equal(back[0], a) and torch.equal(back[1], a.T) and back[1].stride() == a.T.stride()
        assert stash[("gram", 0)] is back  # the last one read is cached
        assert torch.equal(stash[("gram", 1)][0], a[:2]) and ("gram", 2) not in stash
    assert not where.exists()


def test_basisshare_leaves_no_stash_behind_when_it_fails_midway(tiny_tokenizer, calib_file, tiny_model, tmp_path,
                                                                monkeypatch):
    import headshare.methods.basis as basis

    made = []

    class Seen(Stash):
        def __setitem__(self, key, tensors):
            made.append(Path(self._dir.name))
            super().__setitem__(key, tensors)

    def fail(*a, **k):
        assert made and made[-1].exists() and any(made[-1].iterdir())  # the Grams are on disk by now
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(basis, "Stash", Seen)
    monkeypatch.setattr(basis, "fit_bases", fail)
    cfg = headshare.make_config("basisshare", 0.5, calib=calib_file, calib_tokens=128, group=1)
    with pytest.raises(RuntimeError, match="simulated"):
        headshare.make_plan(tiny_model("llama-gqa"), cfg, tokenizer=tiny_tokenizer)
    assert made and not made[-1].exists()
