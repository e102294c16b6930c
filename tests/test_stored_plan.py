"""A shared checkpoint's stored plan, edited at random: every command that reads it refuses a broken one in
one line with exit status 2 (or runs, where the edit happens to keep the plan valid), never a traceback."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from archs import tiny_model
from conftest import TINY_CORPUS

from headshare import share
from headshare.arch import layout_of
from headshare.cli import main
from headshare.plan import Assignment, new_plan
from headshare.units import basis_key, coef_key

MUTATIONS = 200
VALUES = [None, True, False, -1, 0, 1, 2, 3, 99, 2 ** 63, -0.5, 0.5, 1.5, 1e300, math.nan, math.inf, -math.inf,
          "", "x", "kv", "query", "llama", [], [0], [1, 0], [0, 1, 2], {}, {"a": 1}, {"layers": [0], "rank": 2}]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread; many would only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny shared checkpoint whose plan has a chain, a scale, a pruned unit and a basis with its tensors."""
    from conftest import build_tiny_tokenizer

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
    model.save_pretrained(d / "shared", tokenizer=build_tiny_tokenizer())
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
