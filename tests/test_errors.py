"""`headshare.errors`: bad input reaches the user as one line and exit status 2, a bug as a traceback."""

from __future__ import annotations

import dataclasses

import pytest

import headshare.methods as methods
from headshare.cli import main
from headshare.errors import HeadshareError


def _broken(monkeypatch, exc: Exception) -> None:
    """Make the random method fail with `exc`, as a bug inside it would."""
    def fn(*args, **kwargs):
        raise exc

    monkeypatch.setitem(methods.METHODS, "random", dataclasses.replace(methods.METHODS["random"], fn=fn))


@pytest.mark.parametrize("exc", [KeyError("layers.3"), RuntimeError("size mismatch"), ValueError("bad shape"),
                                 IndexError("list index out of range")])
def test_a_bug_in_a_method_reaches_the_user_as_a_traceback(monkeypatch, tiny_dir, tmp_path, exc):
    _broken(monkeypatch, exc)
    with pytest.raises(type(exc)) as err:
        main(["plan", str(tiny_dir), "--method", "random", "--ratio", "0.5", "--out", str(tmp_path / "p.json")])
    assert err.value is exc
    assert not (tmp_path / "p.json").exists()


def test_bad_input_from_a_method_is_one_line_and_exit_2(monkeypatch, tiny_dir, tmp_path, capsys):
    _broken(monkeypatch, HeadshareError("the model is too small for this ratio"))
    assert main(["plan", str(tiny_dir), "--method", "random", "--ratio", "0.5",
                 "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "headshare: error: the model is too small for this ratio"


def test_headshare_error_is_a_value_error():
    """Python callers that catch ValueError keep working."""
    assert issubclass(HeadshareError, ValueError)


@pytest.mark.parametrize("argv, words", [
    (["info", "MISSING"], "MISSING"),  # a path that does not exist
    (["plan", "MODEL", "--ratio", "0.5", "--method", "random", "-o", "sead=1", "--out", "p.json"], "no option 'sead'"),
    (["plan", "MODEL", "--ratio", "0.5", "--method", "random", "-o", "seed=x", "--out", "p.json"], "seed"),
    (["plan", "MODEL", "--ratio", "0.5", "--method", "random", "--out", "p.safetensors"], ".json"),
])
def test_user_errors_are_one_line(tiny_dir, tmp_path, capsys, argv, words):
    argv = [str(tiny_dir) if a == "MODEL" else str(tmp_path / a) if a in ("MISSING", "p.json", "p.safetensors")
            else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("headshare: error:")]
    assert len(lines) == 1 and words in lines[0], err
