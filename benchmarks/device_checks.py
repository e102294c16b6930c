"""CUDA and bf16 checks of the core on SmolLM2 (run on a GPU machine; see device_posttrain.sh).

Each line printed is one check with what it saw; the script exits non-zero if any check fails:
ratio 0 is bit-identical, a 30 % DirectShare saves exactly its units' bytes, save/load through
`headshare.load` and through `trust_remote_code` is bit-identical, and the shared model generates,
all in bf16 on the GPU; plus the gathered and per-run forward strategies agreeing there.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

import headshare
from headshare.arch import layout_of
from headshare.fetch import load_model

failures = []


def check(name: str, ok: bool, seen: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {seen}", flush=True)
    if not ok:
        failures.append(name)


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model("smollm2-135m", dtype=torch.bfloat16)
    model.to(dev).eval()
    ids = tok("def mean(values):\n    \"\"\"Return the arithmetic mean", return_tensors="pt").input_ids.to(dev)
    ids = torch.cat([ids] * 8, 1)  # > GATHER_MIN_TOKENS tokens
    with torch.no_grad():
        ref = model(ids).logits
    zero = headshare.make_plan(model, ratio=0.0)
    p0, b0 = headshare.unique_parameters(model)
    m0, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    m0.to(dev).eval()
    headshare.share(m0, zero)
    with torch.no_grad():
        check(f"ratio 0 bit-identical (bf16, {dev})", torch.equal(m0(ids).logits, ref), "logits equal")
    del m0
    plan = headshare.make_plan(model, ratio=0.3)
    headshare.share(model, plan)
    p1, b1 = headshare.unique_parameters(model)
    layout = layout_of(model.config)
    per_unit = layout.unit_params({p.path: False for p in layout.projections()})
    check("bytes saved exact (bf16)", b0 - b1 == plan.units_shared * per_unit * 2,
          f"{b0 - b1:,} bytes = {plan.units_shared} units x {per_unit:,} params x 2")
    with torch.no_grad():
        shared = model(ids).logits
        mod = sys.modules[headshare.SharedProjection.__module__]
        keep, mod.GATHER_MIN_TOKENS = mod.GATHER_MIN_TOKENS, 10**9
        per_run = model(ids).logits
        mod.GATHER_MIN_TOKENS = keep
    # the two sum in different orders, so bf16 rounding differs; what must hold is the same predictions
    agree = (shared.argmax(-1) == per_run.argmax(-1)).float().mean().item()
    diff = (shared.float() - per_run.float()).abs().max().item()
    check("gathered vs per-run forward (bf16)", agree >= 0.9,
          f"top-1 agreement {agree:.3f} over {shared.shape[1]} positions, max |logit diff| {diff:.3f}")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(f"{d}/out", tokenizer=tok)
        back = headshare.load(f"{d}/out", device=dev).eval()
        with torch.no_grad():
            check("save/load bit-identical (headshare.load)", torch.equal(back(ids).logits, shared), "logits equal")
        rc = AutoModelForCausalLM.from_pretrained(f"{d}/out", trust_remote_code=True, dtype=torch.bfloat16).to(dev)
        with torch.no_grad():
            check("save/load bit-identical (trust_remote_code)", torch.equal(rc.eval()(ids).logits, shared),
                  "logits equal")
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True).to(dev)
    out = model.generate(**chat, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    check("generates (bf16, cuda, 30 % shared)", len(text.strip()) > 0, repr(text))
    if failures:
        sys.exit(f"{len(failures)} check(s) failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
