"""`python -m headshare.bench probe DIR`: the fresh process in which `probe` measures a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .probe import probe_checkpoint


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m headshare.bench", description="benchmark helpers")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="load a checkpoint and print its memory and speed as JSON")
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = probe_checkpoint(args.path, args.prefill_tokens, args.decode_tokens, args.repeats, args.prompt_tokens,
                              args.dtype)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
