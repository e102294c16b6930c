"""`headshare.checkpoint`: saving and loading shared checkpoints, `info`, and the plan they store.

Shared checkpoints save and load bit-exactly (also through transformers), `info` counts what they
store, and every reader of a checkpoint refuses a broken plan in its config.json.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from conftest import IDS, TINY, TINY_CORPUS, outputs, refused, reloads_identically
from transformers import AutoModel, AutoModelForCausalLM

import headshare
from headshare import share
from headshare.arch import layout_of
from headshare.cli import main
from headshare.plan import Assignment, new_plan
from headshare.units import basis_key, coef_key

ARCHS = sorted(TINY)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_bit_identical(arch, tmp_path, tiny_model):
    model = tiny_model(arch)
    headshare.share(model, headshare.make_plan(model, 0.5))
    expected = outputs(model, IDS)
    out = tmp_path / "shared"
    model.save_pretrained(out)
    assert (out / "headshare_modeling.py").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["headshare"]["method"] == "directshare"
    assert torch.equal(outputs(headshare.load(out), IDS), expected)
    auto = AutoModelForCausalLM if arch not in ("bert",) else AutoModel
    remote = auto.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(outputs(remote, IDS), expected)
    # the checkpoint stores exactly the unique parameters: nothing duplicated
    info = headshare.info(out)
    params, _ = headshare.unique_parameters(model)
    assert info["params_shared"] == params
    assert info["units_shared"] == len(cfg["headshare"]["assignments"])


def test_save_load_and_trust_remote_code_are_bit_identical(tmp_path, tiny_model):
    model = tiny_model("qwen2-bias")
    plan = headshare.make_plan(model, 0.5, "random", unit="query", seed=3)
    headshare.share(model, plan)
    reloads_identically(model, IDS, tmp_path / "m")
    ref = outputs(model, IDS)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert torch.equal(outputs(remote, IDS), ref)
    s = headshare.info(tmp_path / "m")
    assert s["unit_kind"] == "query" and s["units_total"] == 12 and s["units_shared"] == 6
    assert "query head" in s["unit"]
    assert s["params_original"] - s["params_shared"] == 6 * (2 * 8 * 32 + 8)  # q rows and bias, o columns


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_a_checkpoint_with_o_weights_stored_as_before_loads_the_same(arch, tmp_path, tiny_model):
    # storage 1 (before input-major o weights): the o projection as (out, own inputs); a Conv1D's was
    # input-major already, so only nn.Linear o weights differ and are transposed back on load
    from safetensors.torch import load_file, save_file

    model = tiny_model(arch)
    headshare.share(model, headshare.make_plan(model, 0.5))
    expected = outputs(model, IDS)
    out = tmp_path / "shared"
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["headshare"]["storage"] == 2
    del cfg["headshare"]["storage"]
    (out / "config.json").write_text(json.dumps(cfg))
    major = {f"{name}.weight" for name, m in model.named_modules() if getattr(m, "input_major", False)}
    assert bool(major) == (arch != "gpt2")
    for f in out.glob("*.safetensors"):
        state = load_file(f)
        changed = {k: v.T.contiguous() for k, v in state.items() if k in major}
        save_file({**state, **changed}, f, metadata={"format": "pt"})
    assert torch.equal(outputs(headshare.load(out), IDS), expected)
    assert headshare.info(out)["params_shared"] == headshare.unique_parameters(model)[0]


def test_checkpoint_bytes_drop_by_shared_weights(tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    layout = layout_of(model.config)
    plan = headshare.make_plan(model, 0.5)
    headshare.share(model, plan)
    model.save_pretrained(tmp_path / "shared")
    info = headshare.info(tmp_path / "shared")
    from safetensors import safe_open
    with safe_open(plain / "model.safetensors", framework="pt") as f:
        plain_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert info["bytes_original"] == plain_bytes
    assert plain_bytes - info["bytes_shared"] == plan.units_shared * layout.unit_params() * 4


def test_generate_after_reload(tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    headshare.share(model, headshare.make_plan(model, 0.3))
    model.save_pretrained(tmp_path / "s")
    loaded = headshare.load(tmp_path / "s")
    out = loaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)
    assert torch.equal(out, model.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False))


def test_existing_output_is_refused_and_kept(tmp_path, tiny_model):
    model = tiny_model("llama-gqa")
    headshare.share(model, headshare.make_plan(model, 0.3))
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        model.save_pretrained(out)
    assert (out / "keep.txt").read_text() == "mine"
    model.save_pretrained(out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary directories left behind


def test_bf16_save_load_is_bit_identical_and_keeps_rope_in_float32(tmp_path, tiny_model):
    # a model loaded in bf16 keeps RoPE's inv_freq (not saved) in float32; a reload must do the same,
    # or the rotary angles round differently and the logits drift
    tiny_model("llama-gqa").save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    headshare.share(model, headshare.make_plan(model, 0.5))
    expected = outputs(model, IDS)
    model.save_pretrained(tmp_path / "shared")
    back = headshare.load(tmp_path / "shared")
    assert back.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert torch.equal(outputs(back, IDS), expected)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "shared", trust_remote_code=True, dtype=torch.bfloat16)
    assert torch.equal(outputs(remote, IDS), expected)


# -- the plan stored in config.json, checked by every reader ------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda a: a.update(source_layer=2), "earlier layer"),
    (lambda a: a.update(unit=5), "outside"),
    (lambda a: a.update(scale=float("nan")), "non-finite scale"),
])
def test_edited_stored_plan_is_refused_by_load_and_info(tmp_path, edit, message, tiny_model):
    import re

    model = tiny_model("llama-gqa")
    headshare.share(model, new_plan(model, "manual", 0.0, assignments=[Assignment(2, 0, 0, 1)]))
    out = tmp_path / "s"
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["headshare"]["assignments"][0])
    (out / "config.json").write_text(json.dumps(cfg))
    for fn in (headshare.load, headshare.info):
        with pytest.raises(ValueError, match=f"{re.escape(str(out))}: the plan stored in config.json is invalid: "
                                             f".*{message}"):
            fn(out)


EDITS = {
    "a source in a later layer": (lambda a: a.update(source_layer=a["layer"]), "earlier layer"),
    "a unit out of range": (lambda a: a.update(unit=99), "outside this model"),
    "a scale that is not finite": (lambda a: a.update(scale=float("nan")), "non-finite scale"),
    "a scale that is not a number": (lambda a: a.update(scale="big"), "must be numbers"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_checkpoint_with_an_edited_plan_is_refused(shared_dirs, capsys, edit):
    change, words = EDITS[edit]
    cfg = json.loads((shared_dirs / "shared" / "config.json").read_text())
    assert cfg["headshare"]["assignments"], "the fixture must share at least one unit"
    change(cfg["headshare"]["assignments"][0])
    (shared_dirs / "shared" / "config.json").write_text(json.dumps(cfg))
    refused(capsys, ["info", shared_dirs / "shared"], "stored in config.json is invalid", words)
    refused(capsys, ["eval", shared_dirs / "shared"], "stored in config.json is invalid", words)
    with pytest.raises(ValueError, match="stored in config.json is invalid"):
        headshare.load(shared_dirs / "shared")


MUTATIONS = 200
VALUES = [None, True, False, -1, 0, 1, 2, 3, 99, 2 ** 63, -0.5, 0.5, 1.5, 1e300, math.nan, math.inf, -math.inf,
          "", "x", "kv", "query", "llama", [], [0], [1, 0], [0, 1, 2], {}, {"a": 1}, {"layers": [0], "rank": 2}]


@pytest.fixture
def one_thread():
    """The tiny model runs fastest on one thread; many would only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model, tiny_tokenizer):
    """A tiny shared checkpoint whose plan has a chain, a scale, a pruned unit and a basis with its tensors."""
    d = tmp_path_factory.mktemp("stored")
    model = tiny_model("llama-gqa")
    layout = layout_of(model.config)
    fitted = {basis_key(0): torch.randn(4, layout.hidden_size)}
    for proj in layout.in_projections():  # layer 2 keeps unit 0 only (unit 1 is pruned)
        fitted[coef_key(2, proj.path)] = torch.randn(proj.unit_width, 4)
    plan = new_plan(model, "manual", 0.3, assignments=[Assignment(1, 0, 0, 1, scale=0.5), Assignment(1, 1, 0, 0)],
                    pruned=[(2, 1)], bases=[{"layers": [2], "rank": 4}], fitted=fitted,
                    notes={"chosen": "manual@kv"})
    share(model, plan)
    model.save_pretrained(d / "shared", tokenizer=tiny_tokenizer)
    (d / "text.txt").write_text("\n".join(TINY_CORPUS * 2))
    return d


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON value, the root included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _mutate(record: dict, rng: random.Random) -> str:
    """One random edit of `record` in place; returns what it did."""
    path, value = rng.choice([p for p in _paths(record) if p[0]])
    parent = record
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    kind = rng.choice(["value", "value", "value", "drop", "unknown", "truncate", "swap", "duplicate", "nudge"])
    if kind == "drop":
        del parent[key]
    elif kind == "unknown" and isinstance(value, dict):
        value[rng.choice(["extra", "Layer", "scale2"])] = rng.choice(VALUES)
    elif kind == "truncate" and isinstance(value, list) and value:
        del value[rng.randrange(len(value)):]
    elif kind == "swap" and isinstance(value, dict) and len(value) >= 2:
        a, b = rng.sample(sorted(value), 2)
        value[a], value[b] = value[b], value[a]
    elif kind == "duplicate" and isinstance(value, list) and value:
        value.append(copy.deepcopy(rng.choice(value)))
    elif kind == "nudge" and isinstance(value, int) and not isinstance(value, bool):
        parent[key] = value + rng.choice([-2, -1, 1, 2])
    else:
        parent[key] = copy.deepcopy(rng.choice(VALUES))
        kind = "value"
    return f"{kind} at {list(path)}"


def _outcome(capsys, argv) -> tuple[int, str]:
    """The exit status of a command, and its error line when it refused (any exception propagates)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("headshare: error:")]
    assert len(lines) == (1 if code == 2 else 0), err
    return code, "".join(lines)


@pytest.mark.usefixtures("one_thread")
def test_random_edits_of_the_stored_plan_are_refused_in_one_line(checkpoint, capsys):
    shared = checkpoint / "shared"
    original = json.loads((shared / "config.json").read_text())
    eval_argv = ["eval", str(shared), "--text", str(checkpoint / "text.txt"), "--window", "16", "--max-tokens", "32",
                 "--device", "cpu"]
    assert _outcome(capsys, ["info", str(shared)])[0] == 0
    assert _outcome(capsys, eval_argv)[0] == 0
    rng = random.Random(23)
    codes = []
    try:
        for i in range(MUTATIONS):
            cfg = copy.deepcopy(original)
            edits = [_mutate(cfg["headshare"], rng) for _ in range(rng.choice([1, 1, 2]))]
            (shared / "config.json").write_text(json.dumps(cfg))
            what = f"mutation {i}: {edits}"
            info_code = _outcome(capsys, ["info", str(shared)])[0]
            assert info_code in (0, 2), what
            if info_code == 0 or i % 10 == 0:  # eval reads the plan the same way; run it on some of the refusals
                assert _outcome(capsys, eval_argv)[0] == info_code, what
            codes.append(info_code)
    finally:
        (shared / "config.json").write_text(json.dumps(original))
    assert codes.count(2) > MUTATIONS // 2 and codes.count(0) > 0  # most edits break the plan, some do not


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("edit, words", [
    (lambda r: r.update(method=5), "'method' must be a string"),
    (lambda r: r["assignments"].pop(), "weights"),  # a borrowing unit dropped: the weights no longer fit
    (lambda r: r["layout"].update(units_per_layer="2"), "positive integer"),
    (lambda r: r.update(ratio=float("nan")), "'ratio' must be a number"),
    (lambda r: r.update(params_original=-1), "params_original"),
    (lambda r: r.update(lunch=1), "unknown keys ['lunch']"),
])
def test_named_edits_are_refused_by_every_reader(checkpoint, capsys, edit, words):
    shared = checkpoint / "shared"
    original = (shared / "config.json").read_text()
    cfg = json.loads(original)
    edit(cfg["headshare"])
    (shared / "config.json").write_text(json.dumps(cfg))
    try:
        for argv in (["info", str(shared)], ["eval", str(shared), "--text", str(checkpoint / "text.txt"),
                                             "--window", "16", "--device", "cpu"],
                     ["share", str(shared), "--method", "directshare", "--ratio", "0.3",
                      "--out", str(checkpoint / "o")]):
            code, line = _outcome(capsys, argv)
            assert code == 2 and "plan stored in config.json" in line and words in line, line
    finally:
        (shared / "config.json").write_text(original)
