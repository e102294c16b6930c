"""How do `headshare share` time and memory scale with depth on a Llama-2-7B-shaped model?

CPU part (the default). A model with Llama-2-7B's shapes (hidden 4096, 32 heads of 128, 32 key/value heads,
MLP 11008, vocab 32000) and random weights (normal(0, 0.02), norms 1) is built once per layer count as a
bf16 safetensors checkpoint in --cache (DIR/llama7b-L{n}). The weights are made on the meta device and
materialised one tensor at a time in bf16, so building never holds an fp32 copy. The calibrated methods
need a tokenizer whose ids fit the 32000 embedding rows, so a byte-level BPE tokenizer with --tok-vocab
(8192) entries is trained on the project's built-in calibration text and saved next to the weights as a
PreTrainedTokenizerFast (SmolLM2's tokenizer has 49152 ids and would not fit).

Each measurement is one fresh process running the real command line,

    headshare share DIR --method M --ratio 0.3 --dtype bfloat16 --device cpu --out OUT --force

timed by the wall clock, with its peak RSS from os.wait4 (ru_maxrss of that process alone). Weight bytes
are the sizes of the checkpoint's safetensors files; each row records layers, method, wall s, wall s per
layer, peak RSS, peak RSS minus weight bytes, the tqdm bars' final states read from its stderr (kept as a
log in --cache/logs), its memory by phase (resident anonymous and file-backed bytes sampled from /proc every
half second, the largest of each while each bar was the last one written) and `headshare info OUT --json`.
Rows are written to --json as they finish, so a stopped run keeps what it has; a run past --timeout is
killed and recorded with the bars it had reached.

Targets: autoshare plans in at most 3 minutes per layer on 2 CPU cores; peak RSS minus the
weights grows by at most one block's weights (0.4 GB in bf16) from 2 to 8 layers.

    python benchmarks/bench_scale.py --layers 2,4,8 --methods directshare --json benchmarks/results/scale_cpu.json
    python benchmarks/bench_scale.py --layers 2 --methods autoshare --timeout 1500 \
        --json benchmarks/results/scale_cpu.json          # appends to the rows already there

Real-model part (--models ALIAS,...): the built-in checkpoints (fetched and cached by `headshare fetch`), per
--dtypes and --methods one timed `share` process as above (weights = the fp32 checkpoint's bytes, halved for
bf16), then `headshare eval` of its output and of the original on --eval-tokens of each of --eval-texts (default
the built-in evaluation text) for the dtypes in --eval-dtypes. A rerun adds only the rows that are missing.

    python benchmarks/bench_scale.py --models qwen2.5-coder-1.5b --methods prune,fitprune --dtypes float32 \
        --eval-texts builtin,news,code --json benchmarks/results/scale_models.json

GPU part (--gpu; refused without a CUDA device). The full 32-layer shape (--gpu-layers) is built from its
config straight on the GPU in bf16 (or on the CPU for --offload mode), nothing is saved, and each of
autoshare and directshare at --ratio runs in a fresh process twice: the whole model on the GPU, and left in
CPU memory with calibration bringing one block at a time to the GPU (what `--offload` does):
`headshare.make_plan(model, config, tokenizer=tok, device="cuda")` then `headshare.share(model, plan)`.
Each row has the wall time of planning and of sharing and torch.cuda.max_memory_allocated (reset after the
model is built, so the whole-model rows include the weights the GPU holds; the offload rows do not).

    python benchmarks/bench_scale.py --gpu --json benchmarks/results/scale_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

GB = 1e9
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=4096)


# -- the model and its tokenizer --------------------------------------------------------------------------

def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
                       **LLAMA7B)


def random_model(layers: int, device: str = "cpu", seed: int = 0):
    """A LlamaForCausalLM of Llama-2-7B's shapes in bf16 with random weights, made tensor by tensor on
    `device` (no fp32 copy, no init pass over a full model)."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=torch.bfloat16).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        # buffers (rotary inv_freq) were emptied too: recompute them the way the module made them
        for module in list(model.modules()):
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "config"):
                with torch.device(device):
                    fresh = type(module)(module.config)
                for name, buf in fresh.named_buffers(recurse=False):
                    setattr(module, name, buf)
    model.eval()
    return model


def make_tokenizer(vocab: int):
    """A byte-level BPE tokenizer (ids < vocab <= 32000) trained on the built-in calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from headshare.data import load_text

    if vocab > LLAMA7B["vocab_size"]:
        raise SystemExit(f"--tok-vocab {vocab} exceeds the model's {LLAMA7B['vocab_size']} embedding rows")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(load_text("builtin", split="calib").splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=LLAMA7B["max_position_embeddings"])


def build_checkpoint(layers: int, cache: Path, tok_vocab: int) -> Path:
    """DIR/llama7b-L{layers}: bf16 safetensors + tokenizer, built once (a finished build leaves DONE)."""
    import torch

    out = cache / f"llama7b-L{layers}"
    if (out / "DONE").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = random_model(layers)
    model.save_pretrained(out, safe_serialization=True)
    del model
    tokenizer = make_tokenizer(tok_vocab)
    tokenizer.save_pretrained(out)
    (out / "DONE").write_text(f"built in {time.perf_counter() - t0:.1f} s\n")
    print(f"built {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# -- progress bars in a stderr log --------------------------------------------------------------------------

BAR = re.compile(r"^(?P<desc>.*?):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<elapsed>[\d:]+)<")


def _seconds(clock: str) -> int:
    s = 0
    for part in clock.split(":"):
        s = 60 * s + int(part)
    return s


def bar_states(log: str) -> list[dict]:
    """The last state of each tqdm bar in `log`, in order: desc, n/total and elapsed seconds."""
    states: list[dict] = []
    for seg in re.split(r"[\r\n]+", log):
        m = BAR.match(seg.strip())
        if not m:
            continue
        state = {"bar": m["desc"].strip(), "n": int(m["n"]), "total": int(m["total"]),
                 "elapsed_s": _seconds(m["elapsed"])}
        last = states[-1] if states else None
        # the same bar goes on (same desc, same total, count not going back): replace its state
        if last and last["bar"] == state["bar"] and last["total"] == state["total"] and state["n"] >= last["n"] \
                and state["elapsed_s"] >= last["elapsed_s"]:
            states[-1] = state
        else:
            states.append(state)
    return states


# -- one CPU measurement -----------------------------------------------------------------------------------

def rss_parts(pid: int) -> tuple[int, int] | None:
    """(anonymous, file-backed) resident bytes of process `pid` now, from /proc (None once it is gone): the
    file-backed part is mostly the memory-mapped safetensors weights, the anonymous part the working memory."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}
        return kb["RssAnon"] * 1024, kb["RssFile"] * 1024
    except (OSError, KeyError, ValueError):
        return None


def current_bar(log_path: Path) -> str | None:
    """The description of the tqdm bar last written to the log (the phase the process is in)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 400))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    for seg in reversed(re.split(r"[\r\n]+", tail)):
        m = BAR.match(seg.strip())
        if m:
            return m["desc"].strip()
    return None


def memory_by_phase(trace: list[tuple[float, str | None, int, int]]) -> list[dict]:
    """Per phase (a bar's description, in order of first appearance): the largest anonymous and file-backed
    resident memory sampled during it, in GB."""
    phases: dict[str, dict] = {}
    for t, bar, anon, file in trace:
        ph = phases.setdefault(bar or "-", {"phase": bar or "-", "from_s": round(t, 1), "anon_gb": 0.0,
                                            "file_gb": 0.0, "total_gb": 0.0})
        ph["anon_gb"] = max(ph["anon_gb"], round(anon / GB, 3))
        ph["file_gb"] = max(ph["file_gb"], round(file / GB, 3))
        ph["total_gb"] = max(ph["total_gb"], round((anon + file) / GB, 3))
    return list(phases.values())


def headshare_exe() -> str:
    """The `headshare` command of this environment (on PATH, or beside this Python)."""
    return shutil.which("headshare") or str(Path(sys.executable).with_name("headshare"))


def method_args(spec: str) -> list[str]:
    """METHOD[@UNIT][+KEY=VALUE...] as command-line arguments: "autoshare+candidates=basisshare@kv" runs
    autoshare with that one candidate, "fitprune@query" fitprune on query-head units."""
    name, *options = spec.split("+")
    method, _, unit = name.partition("@")
    args = ["--method", method] + (["--unit", unit] if unit else [])
    for opt in options:
        args += ["-o", opt]
    return args


def measure(ckpt: Path | str, layers: int, method: str, ratio: float, cache: Path, timeout: float,
            dtype: str = "bfloat16", wbytes: int | None = None, tag: str | None = None,
            keep: bool = False) -> dict:
    """One fresh `headshare share` process: wall time, peak RSS, the bars it reached and the output's info.
    `keep`: leave the output checkpoint (row["out"]) for an evaluation; otherwise it is deleted."""
    tag = tag or f"L{layers}-{method}"
    out = cache / "out" / tag
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{tag}.log"
    exe = headshare_exe()
    cmd = [exe, "share", str(ckpt), *method_args(method), "--ratio", str(ratio), "--dtype", dtype,
           "--device", "cpu", "--out", str(out), "--force", "--json"]
    wbytes = weight_bytes(Path(ckpt)) if wbytes is None else wbytes
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log, open(logs / f"{tag}.out", "w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=log, start_new_session=True)
        deadline = t0 + timeout
        killed = False
        trace = []  # (seconds, bar, anonymous bytes, file-backed bytes) every half second
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            parts = rss_parts(proc.pid)
            if parts:
                trace.append((time.perf_counter() - t0, current_bar(log_path), *parts))
            if time.perf_counter() > deadline and not killed:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * 1024  # kB on Linux
    text = log_path.read_text(errors="replace")
    row = {
        "layers": layers, "method": method, "ratio": ratio, "dtype": dtype,
        "command": "headshare " + " ".join(cmd[1:]),
        "status": "timeout (killed)" if killed else ("ok" if proc.returncode == 0 else f"rc {proc.returncode}"),
        "wall_s": round(wall, 1), "wall_s_per_layer": round(wall / layers, 1),
        "peak_rss_gb": round(rss / GB, 3), "weight_gb": round(wbytes / GB, 3),
        "peak_rss_minus_weights_gb": round((rss - wbytes) / GB, 3),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "bars": bar_states(text), "memory_by_phase": memory_by_phase(trace), "log": str(log_path),
    }
    if proc.returncode == 0:
        info = subprocess.run([exe, "info", str(out), "--json"], capture_output=True, text=True)
        if info.returncode == 0:
            try:
                row["info"] = json.loads(info.stdout)
            except json.JSONDecodeError:
                row["info"] = info.stdout[-4000:]
        if keep:
            row["out"] = str(out)
        else:
            shutil.rmtree(out, ignore_errors=True)  # GBs of output: keep the numbers, not the checkpoint
    else:
        row["stderr_tail"] = text[-2000:]
    return row


def perplexity_of(model: str, dtype: str, max_tokens: int, timeout: float, texts=("builtin",)) -> dict:
    """`headshare eval MODEL --text T --max-tokens N --dtype D --device cpu --json` in a fresh process per
    text: perplexity on the first text ("perplexity"), on the others "perplexity_T", and the seconds taken."""
    exe = headshare_exe()
    row: dict = {}
    for i, text in enumerate(texts):
        t0 = time.perf_counter()
        res = subprocess.run([exe, "eval", model, "--text", text, "--max-tokens", str(max_tokens), "--dtype", dtype,
                              "--device", "cpu", "--json"], capture_output=True, text=True, timeout=timeout)
        key = "" if i == 0 else f"_{text}"
        if res.returncode:
            row.update({f"eval_status{key}": f"rc {res.returncode}", f"eval_stderr_tail{key}": res.stderr[-1500:]})
            continue
        out = json.loads(res.stdout)
        row.update({f"perplexity{key}": round(out["perplexity"], 4), f"eval_tokens{key}": out.get("tokens"),
                    f"eval_s{key}": round(time.perf_counter() - t0, 1)})
    return row


def machine() -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    mem = None
    try:
        mem = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "mem_gb": mem and round(mem / GB, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_at_start": load and [round(x, 2) for x in load]}


def save(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def run_cpu(args) -> None:
    cache = Path(args.cache)
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    doc.setdefault("runs", [])
    doc["model"] = "Llama-2-7B shape (hidden 4096, 32 heads x 128, kv 32, MLP 11008, vocab 32000), random bf16"
    doc["tokenizer"] = f"byte-level BPE, {args.tok_vocab} ids, trained on builtin:calib"
    doc.setdefault("machines", []).append({**machine(), "date": datetime.now(timezone.utc).isoformat()})
    save(path, doc)
    for layers in args.layers:
        ckpt = build_checkpoint(layers, cache, args.tok_vocab)
        for method in args.methods:
            row = measure(ckpt, layers, method, args.ratio, cache, args.timeout)
            row["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            doc["runs"].append(row)
            save(path, doc)
            print(json.dumps({k: row[k] for k in ("layers", "method", "status", "wall_s", "wall_s_per_layer",
                                                   "peak_rss_gb", "peak_rss_minus_weights_gb")}), flush=True)


def run_models(args) -> None:
    """Real built-in models: per model, dtype and method one timed `share` process, then the perplexity of
    its output (and of the original) on --eval-tokens of the built-in evaluation text where the dtype is in
    --eval-dtypes (a bf16 model on a CPU evaluates slowly: no fast bf16 kernels here)."""
    from headshare.fetch import fetch

    cache = Path(args.cache)
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    doc.setdefault("runs", [])
    doc.setdefault("machines", []).append({**machine(), "date": datetime.now(timezone.utc).isoformat()})
    save(path, doc)
    for alias in args.models:
        ckpt = Path(fetch(alias))
        config = json.loads((ckpt / "config.json").read_text())
        layers = config.get("num_hidden_layers") or config["text_config"]["num_hidden_layers"]
        fp32 = weight_bytes(ckpt)  # the cached checkpoint is float32
        for dtype in args.dtypes:
            wbytes = fp32 // 2 if dtype in ("bfloat16", "float16") else fp32
            evaluate = dtype in args.eval_dtypes
            if evaluate and not any(r.get("model") == alias and r["method"] == "original" and r["dtype"] == dtype
                                    for r in doc["runs"]):
                row = {"model": alias, "method": "original", "dtype": dtype, "ratio": 0.0,
                       **perplexity_of(alias, dtype, args.eval_tokens, args.timeout, args.eval_texts)}
                doc["runs"].append(row)
                save(path, doc)
                print(json.dumps(row), flush=True)
            for method in args.methods:
                if any(r.get("model") == alias and r["method"] == method and r["dtype"] == dtype
                       and r.get("status") == "ok" for r in doc["runs"]):
                    continue  # measured already (a rerun appends only what is missing)
                row = measure(ckpt, layers, method, args.ratio, cache, args.timeout, dtype=dtype, wbytes=wbytes,
                              tag=f"{alias}-{dtype}-{method}", keep=evaluate)
                row["model"] = alias
                if evaluate and row.get("out"):
                    out = row.pop("out")
                    row.update(perplexity_of(out, dtype, args.eval_tokens, args.timeout, args.eval_texts))
                    shutil.rmtree(out, ignore_errors=True)
                row["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                doc["runs"].append(row)
                save(path, doc)
                print(json.dumps({k: row.get(k) for k in ("model", "dtype", "method", "status", "wall_s",
                                                           "peak_rss_gb", "peak_rss_minus_weights_gb",
                                                           "perplexity")}), flush=True)


# -- the GPU part ------------------------------------------------------------------------------------------

def gpu_child(args) -> dict:
    """One GPU measurement in this (fresh) process: build, plan, share; print the row as JSON."""
    import torch

    import headshare

    mode, method = args.gpu_child
    device = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = random_model(args.gpu_layers, device="cuda" if mode == "gpu" else "cpu")
    torch.cuda.synchronize()
    built = time.perf_counter() - t0
    tok = make_tokenizer(args.tok_vocab)
    config = headshare.make_config(method, args.ratio)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    plan = headshare.make_plan(model, config, tokenizer=tok, device=device, progress=True)
    torch.cuda.synchronize()
    t_plan = time.perf_counter() - t0
    peak_plan = torch.cuda.max_memory_allocated(device)
    t0 = time.perf_counter()
    headshare.share(model, plan)
    torch.cuda.synchronize()
    t_share = time.perf_counter() - t0
    return {"layers": args.gpu_layers, "method": method, "ratio": args.ratio,
            "mode": "whole model on the GPU" if mode == "gpu" else "offload (weights in CPU memory)",
            "build_s": round(built, 1), "plan_s": round(t_plan, 1), "share_s": round(t_share, 1),
            "plan_s_per_layer": round(t_plan / args.gpu_layers, 2),
            "allocated_after_build_gb": round(base / GB, 3), "max_allocated_plan_gb": round(peak_plan / GB, 3),
            "max_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3),
            "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}


def run_gpu(args) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
                         "run the CPU part without --gpu")
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    doc.setdefault("runs", [])
    doc.setdefault("machines", []).append({**machine(), "gpu": torch.cuda.get_device_name(0),
                                           "date": datetime.now(timezone.utc).isoformat()})
    save(path, doc)
    for method in args.methods:
        for mode in args.gpu_modes:
            cmd = [sys.executable, __file__, "--gpu-child", mode, method, "--gpu-layers", str(args.gpu_layers),
                   "--ratio", str(args.ratio), "--tok-vocab", str(args.tok_vocab)]
            t0 = time.perf_counter()
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                rc, stdout, stderr = res.returncode, res.stdout, res.stderr
            except subprocess.TimeoutExpired as e:
                rc, stdout, stderr = "timeout", e.stdout or "", e.stderr or ""
                stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
                stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
            row = {"method": method, "mode": mode, "status": "ok" if rc == 0 else f"rc {rc}",
                   "wall_s": round(time.perf_counter() - t0, 1), "bars": bar_states(stderr)}
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            if rc == 0 and lines:
                row.update(json.loads(lines[-1]))
            else:
                row["stderr_tail"] = stderr[-3000:]
            doc["runs"].append(row)
            save(path, doc)
            print(json.dumps({k: v for k, v in row.items() if k not in ("bars", "stderr_tail")}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,4,8", help="comma list of layer counts (CPU part)")
    ap.add_argument("--methods", default="directshare,autoshare",
                    help="comma list of METHOD[@UNIT][+KEY=VALUE...] (CPU part)")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--cache", default="/tmp/hs_scale", help="where checkpoints, outputs and logs go")
    ap.add_argument("--json", default="benchmarks/results/scale_cpu.json", help="results (appended to)")
    ap.add_argument("--fresh", action="store_true", help="start --json afresh instead of appending")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    ap.add_argument("--tok-vocab", type=int, default=8192, help="entries of the trained tokenizer (<= 32000)")
    ap.add_argument("--models", default="", help="comma list of built-in model aliases: the real-model part "
                    "(time, memory and perplexity per dtype and method) instead of the 7B shape")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list (real-model part)")
    ap.add_argument("--eval-dtypes", default="float32", help="dtypes whose outputs are evaluated (real-model part)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-texts", default="builtin", help="comma list of evaluation texts (real-model part)")
    ap.add_argument("--gpu", action="store_true", help="the GPU part instead of the CPU part")
    ap.add_argument("--gpu-layers", type=int, default=32)
    ap.add_argument("--gpu-modes", default="gpu,offload", help="comma list of gpu (whole model) and offload")
    ap.add_argument("--gpu-child", nargs=2, metavar=("MODE", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.layers = [int(x) for x in args.layers.split(",") if x]
    args.methods = [m for m in args.methods.split(",") if m]
    args.gpu_modes = [m for m in args.gpu_modes.split(",") if m]
    args.models, args.dtypes, args.eval_dtypes, args.eval_texts = (
        [x for x in v.split(",") if x] for v in (args.models, args.dtypes, args.eval_dtypes, args.eval_texts))
    if args.gpu_child:
        print(json.dumps(gpu_child(args)), flush=True)
    elif args.gpu:
        run_gpu(args)
    elif args.models:
        run_models(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
