"""Bad input, tried as a new user would: one line on stderr, exit status 2, nothing written."""

import json
import shutil

import pytest

import headshare
from headshare.cli import main
from headshare.fetch import load_model

# the paper's method, named: share and plan default to autoshare, slower than these tests need
PAPER = ("--method", "directshare")


@pytest.fixture
def dirs(tmp_path, tiny_llama, tiny_tokenizer, capsys):
    """An original tiny model and a shared checkpoint of it."""
    tiny_llama(num_hidden_layers=3).save_pretrained(tmp_path / "orig")
    tiny_tokenizer.save_pretrained(tmp_path / "orig")
    assert main(["share", str(tmp_path / "orig"), *PAPER, "--ratio", "0.5", "--out", str(tmp_path / "shared")]) == 0
    capsys.readouterr()
    return tmp_path


def refused(capsys, argv, *words) -> str:
    """Run the CLI, expect exit 2 and a single error line containing `words`; returns the line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("headshare: error: "), err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def damage(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00" * 64)


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_safetensors_are_refused_in_one_line(dirs, capsys, how):
    for name in ("orig", "shared"):
        shutil.copytree(dirs / name, dirs / f"bad-{name}")
        damage(dirs / f"bad-{name}" / "model.safetensors", how)
    out = dirs / "out"
    refused(capsys, ["share", dirs / "bad-orig", *PAPER, "--ratio", "0.5", "--out", out], "bad-orig")
    refused(capsys, ["analyze", dirs / "bad-orig"], "model.safetensors", "not a readable safetensors")
    refused(capsys, ["info", dirs / "bad-shared"], "model.safetensors", "not a readable safetensors")
    refused(capsys, ["eval", dirs / "bad-shared"], "model.safetensors")
    assert not out.exists()


def test_an_already_shared_model_is_refused(dirs, capsys):
    out = dirs / "out"
    refused(capsys, ["share", dirs / "shared", *PAPER, "--ratio", "0.3", "--out", out], "already shared")
    refused(capsys, ["analyze", dirs / "shared"], "already shared")
    refused(capsys, ["plan", dirs / "shared", *PAPER, "--ratio", "0.3", "--out", dirs / "p.json"], "already shared")
    assert not out.exists() and not (dirs / "p.json").exists()
    model = headshare.load(dirs / "shared")
    with pytest.raises(ValueError, match="already shared"):
        headshare.make_plan(model, 0.3)
    original = load_model(str(dirs / "orig"))[0]
    with pytest.raises(ValueError, match="already shared"):
        headshare.share(model, headshare.make_plan(original, 0.3))


EDITS = {
    "a source in a later layer": (lambda a: a.update(source_layer=a["layer"]), "earlier layer"),
    "a unit out of range": (lambda a: a.update(unit=99), "outside this model"),
    "a scale that is not finite": (lambda a: a.update(scale=float("nan")), "non-finite scale"),
    "a scale that is not a number": (lambda a: a.update(scale="big"), "must be numbers"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_checkpoint_with_an_edited_plan_is_refused(dirs, capsys, edit):
    change, words = EDITS[edit]
    cfg = json.loads((dirs / "shared" / "config.json").read_text())
    assert cfg["headshare"]["assignments"], "the fixture must share at least one unit"
    change(cfg["headshare"]["assignments"][0])
    (dirs / "shared" / "config.json").write_text(json.dumps(cfg))
    refused(capsys, ["info", dirs / "shared"], "stored in config.json is invalid", words)
    refused(capsys, ["eval", dirs / "shared"], "stored in config.json is invalid", words)
    with pytest.raises(ValueError, match="stored in config.json is invalid"):
        headshare.load(dirs / "shared")


def test_a_text_path_that_does_not_exist_is_refused_before_loading(dirs, capsys):
    refused(capsys, ["eval", dirs / "orig", "--text", dirs / "nope.txt"], "no such text file", "nope.txt")
    refused(capsys, ["share", dirs / "orig", *PAPER, "--ratio", "0.3", "--eval", "--text", "./no/such/dir", "--out",
                     dirs / "out"], "no such text file")
    refused(capsys, ["posttrain", dirs / "orig", "--ratio", "0.3", "--data", dirs / "missing.txt", "--out",
                     dirs / "out"], "no such text file")
    assert not (dirs / "out").exists()


def test_bad_method_options_are_refused_before_loading(dirs, capsys):
    plan = dirs / "p.json"
    refused(capsys, ["plan", dirs / "orig", "--ratio", "0.3", "--method", "fitshare", "--metric", "qk", "--out",
                     plan], "--metric", "fitshare")
    refused(capsys, ["plan", dirs / "orig", "--ratio", "0.3", "--method", "fitshare", "-o", "window=x", "--out",
                     plan], "window", "an integer or none")
    refused(capsys, ["plan", dirs / "orig", *PAPER, "--ratio", "0.3", "-o", "bogus=1", "--out", plan], "bogus", "metric")
    refused(capsys, ["plan", dirs / "orig", "--ratio", "0.3", "--method", "fitshare", "-o", "select=best",
                     "--out", plan], "select", "heldout")
    refused(capsys, ["bench", "--model", dirs / "orig", "--methods", "random", "-o", "rho=1", "--json",
                     dirs / "b.json"], "rho")
    assert not plan.exists() and not (dirs / "b.json").exists()
    with pytest.raises(ValueError, match="no option 'windw'"):
        headshare.make_plan(load_model(str(dirs / "orig"))[0], 0.3, "fitshare", windw=3)
