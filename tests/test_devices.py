"""`headshare.devices`: --device, --dtype and --offload: how they resolve, what they refuse, end to end.

GPUs are not needed: the checks that depend on one (an index past the GPU count, a model that does not
fit) run against a faked torch.cuda.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import TINY_CORPUS

import headshare
from headshare import devices
from headshare.cli import main
from headshare.devices import Placement, check_fits, resolve_device, resolve_dtype, weight_bytes
from headshare.files import safetensors_shapes

# the paper's method, named: share and plan default to autoshare, slower than these tests need
PAPER = ("--method", "directshare")

CPU = torch.device("cpu")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(TINY_CORPUS * 5))
    return path


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda as on a machine with two bf16-capable GPUs of `free[0]` free bytes each (settable)."""
    free = [10 << 30]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(devices, "computes_in", lambda device, dtype: True)
    monkeypatch.setattr(devices, "free_bytes", lambda device: free[0])
    return free


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _dtypes(out) -> set[str]:
    return {kind for f in out.glob("*.safetensors") for _, kind in safetensors_shapes(f).values()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("headshare: error:"), err
    return lines[0]


# -- resolving ----------------------------------------------------------------------------------------

def test_device_names_on_this_machine():
    assert resolve_device("cpu") == resolve_device(" CPU ") == CPU
    want = torch.device("cuda", 0) if torch.cuda.is_available() else CPU
    assert resolve_device("auto") == resolve_device(None) == want


@pytest.mark.parametrize("name", ["gpu", "mps", "cuda:x", "cuda:-1", "cpu:0", "tpu", ""])
def test_unknown_device_is_refused(name):
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_refused(name):
    with pytest.raises(ValueError, match="use --device cpu"):
        resolve_device(name)


def test_gpu_indices(fake_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"has 2 GPUs \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_dtype_names():
    assert resolve_dtype("auto", CPU) == resolve_dtype(None, CPU) == torch.float32
    for names, dtype in ((("float32", "fp32", "FP32"), torch.float32), (("bfloat16", "bf16"), torch.bfloat16),
                         (("float16", "fp16"), torch.float16)):
        if devices.computes_in(CPU, dtype):
            assert {resolve_dtype(n, CPU) for n in names} == {dtype}
    for bad in ("fp8", "float64", "half", "int8"):
        with pytest.raises(ValueError, match="use auto, float32, bfloat16 or float16"):
            resolve_dtype(bad, CPU)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_dtype_the_cpu_cannot_compute_in_is_refused(dtype):
    """What this torch can do on the CPU is tried, not assumed: a dtype it computes in is accepted, one it
    does not is refused (torch 2.13 does both half types; older releases lack float16 matmul)."""
    name = str(dtype).removeprefix("torch.")
    if devices.computes_in(CPU, dtype):
        assert resolve_dtype(name, CPU) == dtype
    else:
        with pytest.raises(ValueError, match="use --dtype float32"):
            resolve_dtype(name, CPU)


def test_auto_dtype_on_a_gpu(fake_gpus, monkeypatch):
    gpu = torch.device("cuda", 0)
    assert resolve_dtype("auto", gpu) == torch.bfloat16
    # e.g. a V100: float16 would overflow bf16 models
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_dtype("auto", gpu) == torch.float32


# -- does it fit ----------------------------------------------------------------------------------------

def test_weight_bytes_from_the_headers_and_from_the_config(tiny_dir, tmp_path, tiny_model):
    n = _params(tiny_model("llama-gqa"))
    assert weight_bytes(tiny_dir, torch.float32) == 4 * n
    assert weight_bytes(tiny_dir, torch.bfloat16) == 2 * n
    bare = tmp_path / "bare"  # no safetensors (as a .bin checkpoint): counted on the meta device
    tiny_model("llama-gqa").config.save_pretrained(bare)
    assert 2 * n <= weight_bytes(bare, torch.bfloat16) <= 2 * n + 1024  # + RoPE's small buffer


def test_fit_check(fake_gpus):
    gpu = torch.device("cuda", 0)
    check_fits(5 << 30, gpu)  # 5 GiB + 2 GiB margin in 10 GiB free
    with pytest.raises(ValueError, match=r"^big does not fit on cuda:0 \(9\.7 GB of weights \+ 2\.1 GB for "
                                         r"activations, 10\.7 GB free\): add --offload$"):
        check_fits(9 << 30, gpu, what="big")
    fake_gpus[0] = 100 << 30  # a large model: the margin is a tenth of its weights
    with pytest.raises(ValueError, match=r"\+ 10\.2 GB for activations"):
        check_fits(95 << 30, gpu)
    check_fits(1 << 50, CPU)  # the CPU is not checked


# -- refusals through the command line ---------------------------------------------------------------------

def _commands(tiny_dir, tmp_path, text_file) -> dict[str, tuple[list[str], object]]:
    """Every command that loads a model: its argv and the path it would write."""
    return {
        "plan": (["plan", str(tiny_dir), *PAPER, "--ratio", "0.5", "--out", str(tmp_path / "plan.json")],
                 tmp_path / "plan.json"),
        "share": (["share", str(tiny_dir), *PAPER, "--ratio", "0.5", "--out", str(tmp_path / "o")], tmp_path / "o"),
        "eval": (["eval", str(tiny_dir), "--text", str(text_file), "--json"], None),
        "bench": (["bench", "--model", str(tiny_dir), "--ratios", "0", "--json", str(tmp_path / "b.json"),
                   "--text", str(text_file), "--no-probe"], tmp_path / "b.json"),
        "report": (["report", str(tiny_dir), "--out", str(tmp_path / "r"), "--text", str(text_file)],
                   tmp_path / "r"),
        "posttrain": (["posttrain", str(tiny_dir), "--ratio", "0.5", "--data", str(text_file), "--steps", "1",
                       "--block-size", "16", "--out", str(tmp_path / "p")], tmp_path / "p"),
    }


REFUSALS = {
    "unknown device": (["--device", "gpu"], "unknown --device 'gpu'"),
    "unknown dtype": (["--dtype", "fp8"], "unknown --dtype 'fp8'"),
    "bad gpu index": (["--device", "cuda:x"], "use auto, cpu, cuda or cuda:N"),
}
if not torch.cuda.is_available():
    REFUSALS["cuda without a gpu"] = (["--device", "cuda"], "--device cpu")


@pytest.mark.parametrize("refusal", list(REFUSALS))
@pytest.mark.parametrize("command", ["plan", "share", "eval", "bench", "report", "posttrain"])
def test_cli_refuses_bad_devices_and_dtypes(tiny_dir, tmp_path, text_file, capsys, command, refusal):
    argv, out = _commands(tiny_dir, tmp_path, text_file)[command]
    flags, message = REFUSALS[refusal]
    assert main([*argv, *flags]) == 2
    assert message in _error_line(capsys)
    assert capsys.readouterr().out == ""
    assert out is None or not out.exists()


@pytest.mark.parametrize("command", ["plan", "share", "eval", "bench", "report", "posttrain"])
def test_cli_refuses_a_dtype_the_cpu_cannot_compute_in(tiny_dir, tmp_path, text_file, capsys, monkeypatch,
                                                       command):
    monkeypatch.setattr(devices, "computes_in", lambda device, dtype: dtype == torch.float32)
    argv, out = _commands(tiny_dir, tmp_path, text_file)[command]
    assert main([*argv, "--device", "cpu", "--dtype", "bfloat16"]) == 2
    assert "cannot compute in bfloat16 on cpu; use --dtype float32" in _error_line(capsys)
    assert out is None or not out.exists()


@pytest.mark.parametrize("command", ["plan", "share", "eval", "bench", "report"])
def test_cli_refuses_a_model_that_does_not_fit(tiny_dir, tmp_path, text_file, capsys, fake_gpus, command):
    fake_gpus[0] = 1000  # bytes
    argv, out = _commands(tiny_dir, tmp_path, text_file)[command]
    assert main([*argv, "--device", "cuda"]) == 2
    line = _error_line(capsys)
    assert "does not fit on cuda:0" in line and "0.0 GB free" in line
    assert line.endswith("use --device cpu" if command == "report" else "add --offload")
    assert out is None or not out.exists()


def test_posttrain_refusals(tiny_dir, tmp_path, text_file, capsys, fake_gpus):
    argv, out = _commands(tiny_dir, tmp_path, text_file)["posttrain"]
    assert main([*argv, "--device", "cuda:1"]) == 2
    assert "CUDA_VISIBLE_DEVICES=1 and --device cuda" in _error_line(capsys)
    assert main([*argv, "--device", "cuda", "--dtype", "float16"]) == 2
    assert "use --dtype bfloat16 or float32" in _error_line(capsys)
    fake_gpus[0] = 1000
    assert main([*argv, "--device", "cuda"]) == 2
    assert "training" in _error_line(capsys)
    assert not out.exists()


def test_eval_offload_refuses_shared_checkpoints_and_tasks(tiny_dir, tmp_path, text_file, capsys, tiny_model):
    model = tiny_model("llama-gqa")
    headshare.share(model, headshare.make_plan(model, 0.5))
    model.save_pretrained(tmp_path / "shared")
    capsys.readouterr()  # saving's progress bar
    base = ["eval", "--text", str(text_file), "--device", "cpu", "--offload"]
    assert main([*base, str(tmp_path / "shared")]) == 2
    assert "--offload cannot run a shared checkpoint" in _error_line(capsys)
    assert main([*base, str(tiny_dir), "--reference", str(tmp_path / "shared")]) == 2
    assert "--offload cannot run a shared checkpoint" in _error_line(capsys)
    assert main([*base, str(tiny_dir), "--tasks", "piqa"]) == 2
    assert "lm-eval does not run an offloaded model" in _error_line(capsys)


def test_offload_refuses_a_shared_model(tiny_model):
    """accelerate's hooks bring one block's weights to the device, but a shared layer also reads an earlier
    block's: its output would be silently wrong, so it is refused."""
    model = tiny_model("llama-gqa")
    headshare.share(model, headshare.make_plan(model, 0.5))
    with pytest.raises(ValueError, match="cannot run a shared model"):
        devices.offload(model, CPU)


# -- end to end on the CPU ----------------------------------------------------------------------------------

def test_share_in_bfloat16_on_the_cpu(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["share", str(tiny_dir), *PAPER, "--ratio", "0.5", "--out", str(out), "--device", "cpu",
                 "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["units_shared"] == 3
    assert _dtypes(out) == {"BF16"}
    model = headshare.load(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 99)


def test_auto_dtype_on_the_cpu_is_float32(tmp_path, tiny_model, tiny_checkpoint):
    """A bfloat16 checkpoint is computed in float32 on the CPU by default (the fast dtype there)."""
    src = tmp_path / "bf16-model"
    tiny_checkpoint(src, tiny_model("llama-gqa").to(torch.bfloat16))
    assert _dtypes(src) == {"BF16"}
    for argv in ([], ["--dtype", "auto", "--device", "auto"]):
        out = tmp_path / f"o{len(argv)}"
        assert main(["share", str(src), *PAPER, "--ratio", "0.5", "--out", str(out), *argv]) == 0
        assert _dtypes(out) == {"F32"}


def test_plan_with_offload_on_the_cpu_matches_plain(tiny_dir, tmp_path, calib_file):
    """--offload keeps the model on the CPU and hands the device to calibration; on a CPU both are the CPU,
    so the fitted plan must be the one made without it."""
    args = ["plan", str(tiny_dir), "--ratio", "0.5", "--method", "fitshare", "--calib", calib_file,
            "--calib-tokens", "64", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    assert main([*args, "--offload", "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    assert a["assignments"] == b["assignments"] and a["pruned"] == b["pruned"]


def test_eval_with_offload_matches_plain(tiny_dir, tmp_path, text_file, capsys):
    """Offloaded for real on the CPU too (parameters on the meta device between calls, brought in per block):
    the perplexity and the KL against an offloaded reference are those of the plain run."""
    def run(*extra):
        assert main(["eval", str(tiny_dir), "--text", str(text_file), "--window", "16", "--max-tokens", "80",
                     "--reference", str(tiny_dir), "--device", "cpu", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain, offloaded = run(), run("--offload")
    assert offloaded["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)
    assert offloaded["kl"] == pytest.approx(0.0, abs=1e-12) and offloaded["top1_agreement"] == 1.0


def test_offload_keeps_the_weights_off_the_device(tiny_model):
    model = tiny_model("llama-gqa")
    ids = torch.tensor([[5, 6, 7, 8]])
    want = model(ids).logits
    devices.offload(model, CPU)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert devices.execution_device(model) == CPU
    assert torch.allclose(model(ids).logits, want, atol=1e-6)


def test_placement_loads_on_the_cpu_when_offloading():
    assert Placement(torch.device("cuda", 0), torch.bfloat16, offload=True).load_device == CPU
    assert Placement(torch.device("cuda", 1), torch.bfloat16).load_device == torch.device("cuda", 1)


def test_posttrain_computes_in_bfloat16_on_the_cpu(tiny_dir, tmp_path, text_file, capsys):
    """posttrain's --dtype is the precision it computes in: bfloat16 mixed precision on float32 weights."""
    argv, out = _commands(tiny_dir, tmp_path, text_file)["posttrain"]
    assert main([*argv, "--device", "cpu", "--dtype", "bfloat16"]) == 0
    record = json.loads((out / "posttrain.json").read_text())
    assert record["device"] == "cpu" and record["bf16"] is True and record["config"]["use_cpu"] is True
    assert {p.dtype for p in headshare.load(out).parameters()} == {torch.float32}
