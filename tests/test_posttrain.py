"""`headshare.posttrain`: PostShare, share-then-tune and tune-only, resuming, several processes.

The constraint pulls pairs together, the result shares and reloads exactly, ties survive
share-then-tune, interrupted runs resume to the same weights, and two processes agree with one.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import IDS, TINY, TINY_CORPUS, outputs
from transformers import TrainerCallback

import headshare
from headshare.arch import blocks, layout_of
from headshare.cli import main
from headshare.data import token_blocks
from headshare.errors import HeadshareError
from headshare.plan import Assignment, new_plan
from headshare.posttrain import (
    PostTrainConfig,
    ProximalPull,
    constraint_loss,
    constraint_pairs,
    distill_loss,
    pair_distances,
    posttrain,
)
from headshare.sharing import SharedProjection, unique_parameters

torch.set_num_threads(2)

TEXT = "\n".join(TINY_CORPUS * 12)
# a 3-layer tiny Llama: at ratio 0.4 its plan holds a chain, (2, 0) -> (1, 0) -> (0, 1)
LAYERS, RATIO = 3, 0.4


@pytest.fixture(scope="session")
def tiny(tiny_llama):
    """Factory: tiny(seed=0) -> the tiny Llama of these tests, LAYERS layers."""
    return functools.partial(tiny_llama, num_hidden_layers=LAYERS)


def cfg(tmp_path=None, **kw) -> PostTrainConfig:
    base = dict(steps=4, block_size=16, batch_size=2, lr=1e-2, save_steps=2, progress=False)
    if tmp_path is not None:
        base["out"] = str(tmp_path / "out")
    base.update(kw)
    return PostTrainConfig(**base)


@pytest.fixture
def blocks16(tiny_tokenizer):
    return token_blocks(tiny_tokenizer, TEXT, 16)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- config ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("mode", "sharethentune"), ("constraint", "l1"), ("lam", 1.5), ("lam", -0.1), ("lam", float("nan")),
    ("lr", 0.0), ("lr", -1e-4), ("steps", 0), ("block_size", 1), ("batch_size", 0), ("save_steps", 0),
    ("seed", -1), ("steps", 2.5), ("weight_decay", -0.1), ("adam_betas", (0.9, 1.0)), ("parts", "qk"),
    ("pull_until", 0.0), ("pull_until", 1.5), ("distill", -0.5), ("distill", 1.5),
])
def test_bad_config_values_name_the_value(field, value):
    with pytest.raises(ValueError) as e:
        PostTrainConfig(**{field: value})
    assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_config_round_trips_and_effective_lambda():
    c = PostTrainConfig(mode="tune-only", lam=0.7, adam_betas=[0.9, 0.99])
    assert PostTrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.effective_lambda == 0.0
    assert PostTrainConfig(lam=0.7).effective_lambda == 0.7
    assert PostTrainConfig(mode="share-then-tune").effective_lambda == 0.0
    assert PostTrainConfig(constraint="prox", lam=0.7).effective_lambda == 0.0  # the pull is not a loss term


def test_config_refuses_unknown_keys_and_newer_versions():
    d = PostTrainConfig().to_dict()
    with pytest.raises(HeadshareError, match="PostTrainConfig has no option 'lamda'.*lam"):
        PostTrainConfig.from_dict({**d, "lamda": 0.3})
    with pytest.raises(HeadshareError, match="version"):
        PostTrainConfig.from_dict({**d, "version": 99})
    with pytest.raises(HeadshareError, match="steps must be an integer >= 1, got '200'"):
        PostTrainConfig.from_dict({**d, "steps": "200"})
    assert PostTrainConfig.defaults()["lam"] == 0.5


# -- the constraint -----------------------------------------------------------------------------------------

def test_chains_are_pulled_towards_their_root(tiny):
    model = tiny()
    plan = headshare.make_plan(model, RATIO)
    src = {(a.layer, a.unit): (a.source_layer, a.source_unit) for a in plan.assignments}
    chained = [u for u, s in src.items() if s in src]
    assert chained, "this tiny model's plan is expected to hold a chain"
    pairs = dict(constraint_pairs(plan))
    for u in chained:
        assert pairs[u] == src[src[u]] and pairs[u] not in src


def test_constraint_matches_hand_computed_distance(tiny):
    model = tiny()
    layout = layout_of(model.config)
    pairs = [((1, 0), (0, 1)), ((2, 1), (0, 0))]
    d, gq = layout.head_dim, layout.q_heads_per_unit
    expect_fro, expect_mse = [], []
    for (l1, u1), (l2, u2) in pairs:
        fro = mse = 0.0
        for name, width in (("q_proj", gq * d), ("k_proj", d), ("v_proj", d)):
            w1 = getattr(blocks(model)[l1].self_attn, name).weight[u1 * width:(u1 + 1) * width]
            w2 = getattr(blocks(model)[l2].self_attn, name).weight[u2 * width:(u2 + 1) * width]
            fro += (w1 - w2).norm().item()
            mse += F.mse_loss(w1, w2).item()
        expect_fro.append(fro)
        expect_mse.append(mse)
    assert pair_distances(model, pairs).tolist() == pytest.approx(expect_fro, rel=1e-5)
    assert pair_distances(model, pairs, "mse").tolist() == pytest.approx(expect_mse, rel=1e-5)
    assert constraint_loss(model, pairs).item() == pytest.approx(sum(expect_fro) / 2, rel=1e-5)
    # parts="qkvo": the o columns of each unit join the sum
    with_o = []
    for ((l1, u1), (l2, u2)), fro in zip(pairs, expect_fro, strict=True):
        w = gq * d
        o1 = blocks(model)[l1].self_attn.o_proj.weight[:, u1 * w:(u1 + 1) * w]
        o2 = blocks(model)[l2].self_attn.o_proj.weight[:, u2 * w:(u2 + 1) * w]
        with_o.append(fro + (o1 - o2).norm().item())
    assert pair_distances(model, pairs, parts="qkvo").tolist() == pytest.approx(with_o, rel=1e-5)
    with pytest.raises(ValueError, match="parts must be one of"):
        pair_distances(model, pairs, parts="qk")


@pytest.mark.parametrize("constraint", ["fro", "mse"])
def test_constraint_drives_pair_distances_down(tiny_tokenizer, blocks16, constraint, tiny):
    """Every selected pair ends closer with the constraint; without it (tune-only) they do not close in."""
    plan = headshare.make_plan(tiny(), RATIO)
    pairs = constraint_pairs(plan)
    before = pair_distances(tiny(), pairs)
    lr = 1e-2 if constraint == "fro" else 1e-1  # mse gradients are smaller by the slice size
    post = posttrain(tiny(), tiny_tokenizer, plan, blocks16,
                     cfg(steps=6, mode="postshare", constraint=constraint, lam=0.5, lr=lr))
    # the model is shared now: measure on an unshared copy trained the same way
    assert isinstance(blocks(post)[1].self_attn.q_proj, SharedProjection)
    free = posttrain(tiny(), tiny_tokenizer, plan, blocks16, cfg(steps=6, mode="tune-only", lr=lr))
    trained = tiny()
    trained.load_state_dict(_unshared_state(post, plan, trained))
    after = pair_distances(trained, pairs)
    after_free = pair_distances(free, pairs)
    assert (after < 0.6 * before).all(), (before, after)
    assert (after < 0.6 * after_free).all(), (after, after_free)


def test_qkvo_constraint_also_pulls_the_o_columns(tiny_tokenizer, blocks16, tiny):
    """With parts="qkvo" the o columns (which sharing ties too) close in; the paper's q/k/v L_w leaves them."""
    plan = headshare.make_plan(tiny(), RATIO)
    pairs = constraint_pairs(plan)

    def o_distance(model):
        return pair_distances(model, pairs, parts="qkvo") - pair_distances(model, pairs)

    class AtEnd(TrainerCallback):  # the distances after training, before posttrain shares the pairs
        def on_train_end(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                self.seen = o_distance(model)

    before = o_distance(tiny()).detach()
    after = {}
    for parts in ("qkv", "qkvo"):
        probe = AtEnd()
        posttrain(tiny(), tiny_tokenizer, plan, blocks16,
                  cfg(steps=6, mode="postshare", lam=0.5, lr=1e-2, parts=parts), callbacks=[probe])
        after[parts] = probe.seen
    assert (after["qkvo"] < 0.6 * before).all(), (before, after["qkvo"])
    assert (after["qkvo"] < 0.6 * after["qkv"]).all(), after


def mixed_plan(model):
    """A chain with non-unit scales, (2, 1) -> (1, 0) -> (0, 1), and two pruned units."""
    return new_plan(model, "manual", 0.0, assignments=[Assignment(1, 0, 0, 1, scale=0.5),
                                                       Assignment(2, 1, 1, 0, scale=-2.0)],
                    pruned=[(1, 1), (2, 0)])


def test_prox_pull_closes_distances_linearly_to_zero(tiny):
    """Without training, the pull's schedule shrinks every member's distance to its root by (T - t) / T."""
    model = tiny()
    plan = headshare.make_plan(model, RATIO)
    pairs = constraint_pairs(plan)
    pull = ProximalPull(plan, layout_of(model.config))
    d0 = pair_distances(model, pairs, parts="qkvo")
    steps = 4
    for t in range(1, steps + 1):
        pull.pull(model, 1.0 / (steps - t + 1))
        d = pair_distances(model, pairs, parts="qkvo")
        assert d.tolist() == pytest.approx((d0 * (steps - t) / steps).tolist(), abs=1e-5)
    assert torch.equal(d, torch.zeros_like(d))


def test_prox_pull_schedule_can_finish_early_and_then_holds(tiny):
    model = tiny()
    plan, layout = headshare.make_plan(model, RATIO), layout_of(model.config)
    assert [ProximalPull(plan, layout).alpha(t, 4) for t in range(1, 5)] == [1 / 4, 1 / 3, 1 / 2, 1]
    half = ProximalPull(plan, layout, until=0.5)
    assert [half.alpha(t, 8) for t in range(1, 9)] == [1 / 4, 1 / 3, 1 / 2, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("name", sorted(TINY))
def test_prox_pull_at_one_gives_what_sharing_gives(name, tiny_model):
    """alpha = 1 makes every architecture's weights (fused qkv, Conv1D, biases, GQA/MQA units) obey a plan with
    a chain, scales and pruned units exactly: sharing then changes no output."""
    model = tiny_model(name)
    plan = mixed_plan(model) if layout_of(model.config).units_per_layer > 1 else \
        new_plan(model, "manual", 0.0, assignments=[Assignment(1, 0, 0, 0, scale=0.5)], pruned=[(2, 0)])
    ProximalPull(plan, layout_of(model.config)).pull(model, 1.0)
    ids = torch.arange(3, 23).view(2, 10)
    pulled = outputs(model, ids)
    assert torch.allclose(outputs(headshare.share(model, plan), ids), pulled, atol=1e-5)


def test_prox_postshare_ends_as_the_shared_model(tmp_path, tiny_tokenizer, blocks16, tiny):
    """With the prox pull the trained weights already obey the plan (a chain, scales, pruned units), so
    sharing them changes no output; the checkpoint keeps the plan's scales and reloads bit-identical."""
    ids = blocks16[:3]

    class AtEnd(TrainerCallback):  # the trained model, before posttrain shares it
        def on_train_end(self, args, state, control, model=None, **kw):
            self.logits = logits(model, ids)

    model = tiny()
    plan = mixed_plan(model)
    probe = AtEnd()
    model = posttrain(model, tiny_tokenizer, plan, blocks16, cfg(tmp_path, constraint="prox", steps=5),
                      callbacks=[probe])
    assert torch.allclose(logits(model, ids), probe.logits, atol=1e-5)
    # the same training without the pull would not have survived the sharing
    free = posttrain(tiny(), tiny_tokenizer, plan, blocks16, cfg(steps=5, mode="tune-only"))
    unshared = logits(free, ids)
    assert not torch.allclose(logits(headshare.share(free, plan), ids), unshared, atol=1e-2)
    out = tmp_path / "out"
    assert torch.equal(logits(headshare.load(out), ids), logits(model, ids))
    record = json.loads((out / "posttrain.json").read_text())
    assert record["effective_lambda"] == 0.0 and record["mean_pair_distance_fro_after"] == 0.0
    assert [a["scale"] for a in json.loads((out / "config.json").read_text())["headshare"]["assignments"]] == \
        [0.5, -2.0]
    logged = [r for r in json.loads((out / "trainer_state.json").read_text())["log_history"] if "lm_loss" in r]
    assert all(r["loss"] == pytest.approx(r["lm_loss"], rel=1e-4) for r in logged)  # no penalty in the loss
    c = [r["constraint_loss"] for r in logged]
    assert c[-1] < 0.5 * c[0]  # measured before each step's pull: (5 - 4) / 5 of the start, plus drift


def _unshared_state(shared, plan, like):
    """Rebuild a plain state dict from a shared model by reading every projection's effective weight."""
    state = dict(like.state_dict())
    for k, v in shared.state_dict().items():
        if v.shape == state[k].shape:
            state[k] = v
    layout = layout_of(like.config)
    x = torch.eye(layout.hidden_size)
    for layer, block in enumerate(blocks(shared)):
        for proj in layout.projections():
            if proj.role != "out":
                continue
            mod = block.get_submodule(proj.path)
            # feeding the identity gives W^T: the full effective weight, borrowed rows included
            with torch.no_grad():
                state[f"model.layers.{layer}.{proj.path}.weight"] = mod(x).t().contiguous()
    return state


# -- postshare output ----------------------------------------------------------------------------------------

def test_postshare_checkpoint_reloads_bit_identical(tmp_path, tiny_tokenizer, blocks16, tiny):
    model = tiny()
    plan = headshare.make_plan(model, RATIO)
    model = posttrain(model, tiny_tokenizer, plan, blocks16, cfg(tmp_path))
    out = tmp_path / "out"
    ids = blocks16[:3]
    loaded = headshare.load(out)
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    record = json.loads((out / "posttrain.json").read_text())
    assert record["mode"] == "postshare" and record["shared"] and record["steps"] == 4
    assert [(p["layer"], p["unit"], p["root_layer"], p["root_unit"]) for p in record["pairs"]] == \
        [(*a, *r) for a, r in constraint_pairs(plan)]
    assert record["mean_pair_distance_fro_after"] < record["mean_pair_distance_fro_before"]
    assert json.loads((out / "config.json").read_text())["headshare"]["assignments"] == \
        plan.to_dict()["assignments"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [r for r in history if "lm_loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:  # the logged total is exactly the weighted sum of the two logged terms
        assert r["loss"] == pytest.approx(0.5 * r["lm_loss"] + 0.5 * r["constraint_loss"], rel=1e-4)
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert not (tmp_path / "out.work").exists()  # checkpoints are removed after a finished run


def test_refuses_existing_output_and_stale_checkpoints(tmp_path, tiny_tokenizer, blocks16, tiny):
    plan = headshare.make_plan(tiny(), RATIO)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        posttrain(tiny(), tiny_tokenizer, plan, blocks16, cfg(tmp_path))
    with pytest.raises(ValueError, match="needs a plan"):
        posttrain(tiny(), tiny_tokenizer, None, blocks16, cfg())
    with pytest.raises(ValueError, match="builtin:eval"):
        posttrain(tiny(), tiny_tokenizer, plan, "builtin:eval", cfg())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        posttrain(tiny(), tiny_tokenizer, plan, blocks16, cfg(work_dir=str(tmp_path / "w"), resume=True))


def test_posttrain_keeps_query_heads_tied(tmp_path, tiny_tokenizer, tiny):
    model = tiny()
    plan = headshare.make_plan(model, 0.3, "directshare", unit="query")
    data = token_blocks(tiny_tokenizer, "\n".join(TINY_CORPUS * 12), 16)
    cfg = PostTrainConfig(steps=3, block_size=16, batch_size=2, lr=1e-2, save_steps=2, progress=False,
                          out=str(tmp_path / "out"))
    model = posttrain(model, tiny_tokenizer, plan, data, cfg)
    loaded = headshare.load(tmp_path / "out")
    assert torch.equal(outputs(loaded, IDS % 50), outputs(model, IDS % 50))
    assert headshare.info(tmp_path / "out")["unit_kind"] == "query"
    for a in plan.assignments:  # the borrower reads the source layer's q rows: one tensor, not a copy
        q = blocks(loaded)[a.layer].self_attn.q_proj
        assert any(seg[0] is blocks(loaded)[a.source_layer].self_attn.q_proj for seg in q._segments)
        assert q.weight is None or q.weight.shape[0] < 32


# -- share-then-tune ----------------------------------------------------------------------------------------

def test_share_then_tune_keeps_ties(tmp_path, tiny_tokenizer, blocks16, tiny):
    model = tiny()
    plan = headshare.make_plan(model, RATIO)
    reference = headshare.share(tiny(), plan)  # the same shared structure, untrained
    names0 = {k: v.shape for k, v in reference.named_parameters()}
    model = posttrain(model, tiny_tokenizer, plan, blocks16, cfg(tmp_path, mode="share-then-tune"))
    # no parameter appeared or grew: the borrowed slices were never materialised
    assert {k: v.shape for k, v in model.named_parameters()} == names0
    assert unique_parameters(model) == unique_parameters(reference)
    layout = layout_of(model.config)
    params = {id(p) for p in model.parameters()}
    x = torch.randn(5, layout.hidden_size)
    moved = False
    for (layer, unit), (rl, ru) in constraint_pairs(plan):
        for proj in layout.projections():
            mod = blocks(model)[layer].get_submodule(proj.path)
            root = blocks(model)[rl].get_submodule(proj.path)
            ref_root = blocks(reference)[rl].get_submodule(proj.path)
            # the borrowing module stores no copy of the unit; the root's parameter is a model parameter
            assert unit not in mod.own and ru in root.own and id(root.weight) in params
            for p, (_, off, width) in enumerate(proj.parts):
                a, b = root.own_range(ru, p)
                w_root = root.weight.narrow(root.dim, a, b - a)  # o: input-major, (width, out)
                moved |= not torch.equal(w_root, ref_root.weight.narrow(root.dim, a, b - a))
                cols = slice(off + unit * width, off + (unit + 1) * width)
                with torch.no_grad():  # what the borrowing unit computes is the root's trained slice
                    if proj.role == "out":
                        got, want = mod(x)[:, cols], F.linear(x, w_root)
                    else:  # input only in this unit's features: the output is its contribution alone
                        xin = torch.zeros(5, mod.in_features)
                        xin[:, cols] = x[:, :width]
                        got, want = mod(xin), x[:, :width] @ w_root
                assert torch.allclose(got, want, rtol=0, atol=1e-6), (layer, unit, proj.path)
    assert moved, "training did not change the root weights, so the test shows nothing"
    out = tmp_path / "out"
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert headshare.info(out)["params_shared"] == unique_parameters(model)[0]
    ids = blocks16[:2]
    assert torch.equal(logits(model, ids), logits(headshare.load(out), ids))


def test_share_then_tune_starts_from_the_plans_fitted_weights(tiny_tokenizer, blocks16, tiny):
    """share-then-tune shares first, so a plan's fitted weights (here: refitted o columns of unit (1, 1), which
    (2, 0) borrows) are in the model when training starts."""
    from headshare.units import read_fitted, weights_fingerprint

    model = tiny()
    o = layout_of(model.config).o_projection()
    fitted = {k: 2 * v for k, v in read_fitted(model, [(1, 1)], [o.path]).items()}
    plan = new_plan(model, "manual", 0.0, assignments=[Assignment(2, 0, 1, 1)], fitted=fitted,
                    base_sha1=weights_fingerprint(model))

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            mod = blocks(model)[1].get_submodule(o.path)
            a, b = mod.own_range(1, 0)
            self.cols = mod.weight.detach()[a:b].T.clone()  # o weights are stored input-major

    probe = AtStart()
    posttrain(model, tiny_tokenizer, plan, blocks16, cfg(steps=1, mode="share-then-tune"), callbacks=[probe])
    assert torch.equal(probe.cols, fitted[f"1.{o.path}.unit1"])


def test_distill_loss_is_zero_against_itself_and_the_kl_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    assert distill_loss(a, a) == 0
    p, q = torch.softmax(b.double(), -1), torch.softmax(a.double(), -1)  # KL(ref=b || model=a), mean per position
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(distill_loss(a, b)) == pytest.approx(float(want), rel=1e-5)


def test_distillation_trains_towards_the_original_and_logs_the_kl(tmp_path, tiny_tokenizer, blocks16, tiny):
    """share-then-tune with distill=1: the loss is the KL to the model as it came (logged as `kl`, the LM loss
    only measured), the teacher stays the unshared original, and training lowers that KL."""
    model = tiny()
    plan = headshare.make_plan(model, RATIO)
    ids = blocks16[:4]
    original = logits(tiny(), ids)
    shared = headshare.share(tiny(), plan)
    before = float(distill_loss(logits(shared, ids), original))
    assert before > 1e-4, "sharing changed nothing, so there is nothing to distil"
    trained = posttrain(model, tiny_tokenizer, plan, blocks16,
                        cfg(tmp_path, mode="share-then-tune", distill=1.0, steps=16, lr=2e-3))
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    rows = [r for r in history if "kl" in r]
    assert rows and all(r["loss"] == pytest.approx(r["kl"], abs=1e-6) for r in rows)  # kl is logged to 6 places
    assert all(r["lm_loss"] != pytest.approx(r["kl"], rel=1e-2) for r in rows)
    after = float(distill_loss(logits(trained, ids), original))
    assert after < 0.7 * before
    assert unique_parameters(trained) == unique_parameters(shared)  # still the shared model


# -- tune-only ------------------------------------------------------------------------------------------------

def test_tune_only_saves_a_plain_checkpoint(tmp_path, tiny_tokenizer, blocks16, tiny):
    from transformers import AutoModelForCausalLM

    model = tiny()
    plan = headshare.make_plan(model, RATIO)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model = posttrain(model, tiny_tokenizer, plan, blocks16, cfg(tmp_path, mode="tune-only", lam=0.5))
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert "headshare" not in config
    record = json.loads((out / "posttrain.json").read_text())
    assert record["shared"] is False and record["effective_lambda"] == 0.0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    # lambda 0: the logged loss is the LM loss alone, the constraint only measured
    assert all(r["loss"] == pytest.approx(r["lm_loss"], rel=1e-4) for r in history if "lm_loss" in r)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert any(not torch.equal(init[k], v) for k, v in reloaded.state_dict().items())
    ids = blocks16[:2]
    assert torch.equal(logits(model, ids), logits(reloaded, ids))


# -- resume ---------------------------------------------------------------------------------------------

class _Crash(Exception):
    pass


@pytest.mark.parametrize("constraint", ["fro", "prox"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, tiny_tokenizer, blocks16, constraint, tiny):
    """4 steps straight vs 2 steps, a crash right after checkpoint-2, then --resume to 4: bit-identical.

    Exact equality holds because the Trainer's sampler is seeded per epoch (it skips the batches
    already seen on resume), the checkpoint carries the optimizer, scheduler and RNG states in
    full precision, and everything runs on one CPU process in fp32.
    """
    from transformers import TrainerCallback

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise _Crash

    plan = headshare.make_plan(tiny(), RATIO)
    straight = posttrain(tiny(), tiny_tokenizer, plan, blocks16, cfg(tmp_path / "a", constraint=constraint))
    work = tmp_path / "b" / "out.work"
    with pytest.raises(_Crash):
        posttrain(tiny(), tiny_tokenizer, plan, blocks16, cfg(tmp_path / "b", constraint=constraint),
                  callbacks=[CrashAfterSave()])
    assert not (tmp_path / "b" / "out").exists()
    assert [p.name for p in (work / "trainer").glob("checkpoint-*")] == ["checkpoint-2"]
    with pytest.raises(FileExistsError, match="resume"):
        posttrain(tiny(), tiny_tokenizer, plan, blocks16, cfg(tmp_path / "b", constraint=constraint))
    resumed = posttrain(tiny(), tiny_tokenizer, plan, blocks16, cfg(tmp_path / "b", resume=True, constraint=constraint))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history = json.loads((tmp_path / "b" / "out" / "trainer_state.json").read_text())["log_history"]
    assert [r["step"] for r in history if "lm_loss" in r] == [1, 2, 3, 4]


# -- CLI ----------------------------------------------------------------------------------------------------

@pytest.fixture
def train_dir(tmp_path, tiny, tiny_checkpoint):
    """tmp_path / "tiny": the tiny Llama with the tokenizer; tmp_path / "train.txt": the training text."""
    path = tiny_checkpoint(tmp_path / "tiny", tiny())
    (tmp_path / "train.txt").write_text(TEXT)
    return path


def test_cli_posttrain_end_to_end(tmp_path, train_dir, capsys):
    out = tmp_path / "cli-out"
    argv = ["posttrain", str(train_dir), "--ratio", str(RATIO), "--data", str(tmp_path / "train.txt"),
            "--steps", "3", "--block-size", "16", "--batch-size", "2", "--lr", "1e-2", "--save-steps", "2",
            "--lambda", "0.5", "--constraint", "fro", "--seed", "1", "--distill", "0.5", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "units shared" in printed.out and "mean pair distance" in printed.err
    model = headshare.load(out)
    record = json.loads((out / "posttrain.json").read_text())
    assert record["config"]["seed"] == 1 and record["config"]["lam"] == 0.5 and record["steps"] == 3
    assert record["config"]["distill"] == 0.5
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rows = [r for r in history if "lm_loss" in r]
    # (1 - lambda) x ((1 - distill) x LM + distill x KL) + lambda x L_w, each logged to 6 places
    assert rows and all(r["loss"] == pytest.approx(0.5 * (0.5 * r["lm_loss"] + 0.5 * r["kl"])
                                                   + 0.5 * r["constraint_loss"], abs=1e-5) for r in rows)
    assert len(record["pairs"]) == len(model.config.headshare["assignments"]) > 0
    assert main(argv) == 2  # the output exists now
    assert "not empty" in capsys.readouterr().err


def test_cli_prox_postshare_of_a_fitted_plan(tmp_path, train_dir, capsys):
    """A fitted plan (fitshare: pruned units, scales, refitted o columns) post-trains under the prox pull from
    the original weights; the output is the plan's shared model, with its pruned units and scales."""
    out = tmp_path / "fit-out"
    argv = ["posttrain", str(train_dir), "--ratio", "0.5", "--method", "fitshare", "--calib", str(tmp_path / "train.txt"),
            "--data", str(tmp_path / "train.txt"), "--steps", "4", "--block-size", "16", "--batch-size", "2",
            "--constraint", "prox", "--pull-until", "0.5", "--out", str(out)]
    assert main(argv) == 0
    assert "fitted weights are not used; postshare trains the original ones" in capsys.readouterr().err
    record = json.loads((out / "posttrain.json").read_text())
    stored = json.loads((out / "config.json").read_text())["headshare"]
    assert record["config"]["pull_until"] == 0.5 and record["mean_pair_distance_fro_after"] in (0.0, None)
    assert stored["method"] == "fitshare" and len(stored["assignments"]) + len(stored["pruned"]) == 3
    # the trained weights are the ones to use: the checkpoint carries no fitted weights of the plan
    assert stored["fitted"] == [] and stored["base_sha1"] is None
    assert headshare.info(out)["units_refitted"] == 0
    assert [a["scale"] for a in stored["assignments"]] == [a["scale"] for a in record["plan"]["assignments"]]
    ids = torch.arange(2, 30).view(1, -1)
    assert torch.isfinite(logits(headshare.load(out), ids)).all()


@pytest.mark.parametrize("flag,value,message", [
    ("--lambda", "2", "lam must be a number in [0, 1], got 2.0"),
    ("--lr", "0", "lr must be a positive number, got 0.0"),
    ("--steps", "0", "steps must be an integer >= 1, got 0"),
    ("--pull-until", "0", "pull_until must be a number in (0, 1], got 0.0"),
    ("--distill", "1.5", "distill must be a number in [0, 1], got 1.5"),
])
def test_cli_bad_values_exit_2(tmp_path, train_dir, capsys, flag, value, message):
    argv = ["posttrain", str(train_dir), "--ratio", "0.3", "--out", str(tmp_path / "o"), flag, value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- several processes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("constraint,port", [("fro", 29517), ("prox", 29518)])
def test_two_processes_under_accelerate_match_one(tmp_path, train_dir, constraint, port, tiny):
    """`accelerate launch` with 2 processes on the CPU (gloo DDP) against one process with the same global batch.

    Launcher: `accelerate launch --cpu --num_processes 2` starts ONE process unless it is given an MPI
    hostfile (accelerate's multi-CPU path is mpirun), so the test uses `--multi_gpu`, accelerate's
    torchrun-based launcher, with CUDA hidden: TrainingArguments(use_cpu=True) then sets up gloo DDP.

    Asserted: both runs finish and write checkpoints that `headshare.load` reads; the pairs' distance
    falls in both; both log the same steps with the same lm_loss and constraint_loss (rel 1e-4); and
    the final weights agree to 1e-4 in every element while training moved them by > 0.1 in norm
    (measured: max difference 2e-6, moved 2.7). With the prox pull every rank pulls its own replica the
    same way after the same synchronised step, so the replicas stay equal. Both runs see the same blocks per step (process k
    takes batch k of the seeded order, one process takes both in a batch of 2) and DDP averages the
    two per-process mean losses, so only the summation order differs: close, not bit-identical.
    """
    common = ["--ratio", str(RATIO), "--data", str(tmp_path / "train.txt"), "--steps", "4",
              "--block-size", "16", "--lr", "1e-2", "--save-steps", "4", "--constraint", constraint]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    multi = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         "-m", "headshare.cli", "posttrain", str(train_dir), *common, "--batch-size", "1",
         "--out", str(tmp_path / "multi")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert main(["posttrain", str(train_dir), *common, "--batch-size", "2", "--out", str(tmp_path / "single")]) == 0

    rec = {k: json.loads((tmp_path / k / "posttrain.json").read_text()) for k in ("multi", "single")}
    assert rec["multi"]["processes"] == 2 and rec["single"]["processes"] == 1
    assert rec["multi"]["global_batch"] == rec["single"]["global_batch"] == 2
    for r in rec.values():
        assert r["steps"] == 4 and r["mean_pair_distance_fro_after"] < r["mean_pair_distance_fro_before"]
    hist = {k: [r for r in json.loads((tmp_path / k / "trainer_state.json").read_text())["log_history"]
                if "lm_loss" in r] for k in rec}
    assert [r["step"] for r in hist["multi"]] == [r["step"] for r in hist["single"]] == [1, 2, 3, 4]
    for m, o in zip(hist["multi"], hist["single"], strict=True):
        assert m["lm_loss"] == pytest.approx(o["lm_loss"], rel=1e-4)
        assert m["constraint_loss"] == pytest.approx(o["constraint_loss"], rel=1e-4)

    init = tiny().state_dict()
    a = headshare.load(tmp_path / "multi").state_dict()
    b = headshare.load(tmp_path / "single").state_dict()
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    moved = sum((b[k] - init[k]).pow(2).sum() for k in b if init[k].shape == b[k].shape).sqrt()
    assert moved > 0.1


# -- the real model ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_postshare_short_run(tmp_path, smollm2_dir):
    """Three steps of PostShare on SmolLM2-135M: pairs move together and the shared checkpoint reloads exactly."""
    from headshare.fetch import load_model

    model, tok = load_model(smollm2_dir)
    plan = headshare.make_plan(model, 0.3)
    assert plan.units_shared == 27
    model = posttrain(model, tok, plan, "builtin:calib",
                      PostTrainConfig(steps=3, block_size=128, save_steps=100, lr=1e-4, out=str(tmp_path / "o"),
                                      progress=False))
    record = json.loads((tmp_path / "o" / "posttrain.json").read_text())
    assert record["mean_pair_distance_fro_after"] < record["mean_pair_distance_fro_before"]
    ids = tok("Return the number of items in the collection.", return_tensors="pt")["input_ids"]
    assert torch.equal(logits(model, ids), logits(headshare.load(tmp_path / "o"), ids))
    info = headshare.info(tmp_path / "o")
    assert info["units_shared"] == 27 and info["params_shared"] < info["params_original"]


def test_cli_help_lists_posttrain_flags(capsys):
    with pytest.raises(SystemExit):
        main(["posttrain", "--help"])
    text = capsys.readouterr().out
    for flag in ("--lambda", "--constraint", "--lr", "--block-size", "--batch-size", "--steps", "--mode",
                 "--resume", "--seed", "--method", "--save-steps", "--data", "--option", "--pull-until"):
        assert flag in text


def test_basis_plans_train_with_share_then_tune_and_the_basis_stays_one_tensor(tiny_tokenizer, blocks16,
                                                                                   calib_file, tiny):
    from headshare.methods import BasisShareConfig
    from headshare.sharing import BASIS_NAME

    model = tiny()
    plan = headshare.make_plan(model, BasisShareConfig(ratio=0.3, group=3, prune=0.0, calib=calib_file,
                                                       calib_tokens=128), tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="share-then-tune"):
        posttrain(tiny(), tiny_tokenizer, plan, blocks16, cfg(steps=1))
    model = posttrain(model, tiny_tokenizer, plan, blocks16, cfg(steps=2, mode="share-then-tune"))
    basis = getattr(blocks(model)[0].self_attn, BASIS_NAME)
    assert not torch.equal(basis.weight, plan.fitted["basis0"])  # trained
    for block in blocks(model):
        assert block.self_attn.v_proj._basis.weight is basis.weight  # still the one tensor every layer reads
