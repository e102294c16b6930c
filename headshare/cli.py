"""The `headshare` command line: one subcommand per step, each a thin layer over the Python API.

Errors a user can cause (bad ratio, missing model, existing output) end in one line on stderr and
exit status 2; nothing is written unless the whole step succeeded.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

from .arch import UNIT_KINDS
from .errors import HeadshareError
from .files import atomic_write_text, check_output
from .methods import METHODS

# bad input the user can fix: one line and exit 2; every other exception is a bug and keeps its traceback
USER_ERRORS = (HeadshareError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ratio(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if not 0 <= r < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {r}")
    return r


def _method_options(args, method: str) -> dict:
    """The method's config options from the command line: --metric/--seed/--calib/--calib-tokens where given,
    and every --option KEY=VALUE; an option the method does not have is refused."""
    from .methods import get_method, parse_option

    config = get_method(method).config
    names = config.options()
    kw = {}
    for name in ("metric", "seed", "calib", "calib_tokens"):
        v = getattr(args, name, None)
        if v is not None:
            if name not in names:
                if name == "seed" and getattr(args, "command", None) == "posttrain":
                    continue  # posttrain's --seed seeds the training too; the method takes it only if it has one
                raise HeadshareError(f"--{name.replace('_', '-')}: method {method!r} has no such option "
                                 f"(its options: {', '.join(names) or 'none'})")
            kw[name] = v
    for text in getattr(args, "option", None) or ():
        k, v = parse_option(config, text)
        kw[k] = v
    if getattr(args, "unit", None) is not None:
        kw["unit"] = args.unit
    return kw


def _write_json(obj, path: str | None) -> None:
    text = json.dumps(obj, indent=1)
    if path in (None, "-"):
        print(text)
    else:
        atomic_write_text(path, text + "\n")


# -- commands ------------------------------------------------------------------------------------------

def cmd_fetch(args) -> None:
    from .fetch import fetch

    print(fetch(args.alias, force=args.force))


def cmd_analyze(args) -> None:
    from .fetch import resolve_model
    from .similarity import analysis

    result = analysis(resolve_model(args.model), metric=args.metric)
    _write_json(result, args.out)
    best = result["best_matches"]
    if best and args.out not in (None, "-"):
        top = max(best, key=lambda b: b["similarity"])
        _log(f"{len(best)} units matched; best pair ({top['layer']},{top['unit']}) <- "
             f"({top['source_layer']},{top['source_unit']}) cosine {top['similarity']:.4f}; wrote {args.out}")


def _placement(args):
    """The command's --device, --dtype and --offload, resolved once (a bad one fails before anything loads)."""
    from .devices import placement

    if getattr(args, "_place", None) is None:
        args._place = placement(args.device, args.dtype, getattr(args, "offload", False))
    return args._place


def _is_shared_checkpoint(path: str | Path) -> bool:
    """Whether a model directory holds a headshare checkpoint (its config.json has a "headshare" section)."""
    try:
        return "headshare" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # unreadable: the loader says what is wrong with it


def _check_fits(paths: list[str], place, what: str, *, copies: int = 1, hint: str = "add --offload") -> None:
    """Refuse before loading when the models in `paths` (`copies` of each at once) do not fit on the GPU.
    Nothing to check with --offload (only a block is on the GPU at a time) or on the CPU."""
    from .devices import check_fits, weight_bytes

    if place.offload or place.device.type != "cuda":
        return
    weights = copies * sum(weight_bytes(p, place.dtype) for p in paths)
    check_fits(weights, place.device, what=what, hint=hint)


def _twice(model: str) -> str:
    return f"{model} (twice: the original and the copy that is shared)"


def _load(args, path: str | None = None, *, copies: int = 1, hint: str = "add --offload"):
    """Resolve args.model (unless already resolved to `path`), check that `copies` of it fit on the device,
    and load it there in the command's dtype (on the CPU with --offload)."""
    from .fetch import load_model, resolve_model

    place = _placement(args)
    path = path or resolve_model(args.model)
    _check_fits([path], place, _twice(args.model) if copies == 2 else args.model, copies=copies, hint=hint)
    model, tok = load_model(path, dtype=place.dtype, device=place.load_device)
    return path, model, tok


def _plan_source(args):
    """What the plan will come from, checked before the model loads: the plan file read in full, or the
    method's config built from the options (bad options fail here), or None when neither is given."""
    from .methods import make_config
    from .plan import SharePlan

    if getattr(args, "plan", None):
        return SharePlan.load(args.plan)
    if args.ratio is None:
        return None
    return make_config(args.method, args.ratio, **_method_options(args, args.method))


def _make_plan(source, model, tok, args):
    from .methods import make_plan
    from .plan import SharePlan

    if source is None:
        raise HeadshareError("give --ratio (or --plan FILE)")
    if isinstance(source, SharePlan):
        return source
    place = _placement(args)
    # with --offload the model stays on the CPU and calibration brings one block at a time to the device;
    # otherwise the model is on the device already and calibration follows it
    return make_plan(model, source, tokenizer=tok, progress=True, device=place.device if place.offload else None)


def cmd_plan(args) -> None:
    if Path(args.out).suffix == ".safetensors":
        raise HeadshareError(f"--out {args.out}: give the plan a .json name; fitted weights go beside it")
    _placement(args)  # a bad --device/--dtype fails before anything else
    source = _plan_source(args)
    _, model, tok = _load(args)
    plan = _make_plan(source, model, tok, args)
    plan.save(args.out)
    fitted = f", {len(plan.fitted)} fitted weights in {plan.fitted_file(args.out)}" if plan.fitted else ""
    based = f", {plan.units_based(plan.layout['units_per_layer'])} on {len(plan.bases)} shared bases" \
        if plan.bases else ""
    kept = f" (kept {plan.notes['chosen']})" if plan.notes.get("chosen") else ""
    _log(f"{plan.method}{kept}: {plan.units_shared} units shared, {len(plan.pruned)} pruned{based} of "
         f"{plan.layout['num_layers'] * plan.layout['units_per_layer']}; wrote {args.out}{fitted}")


def cmd_share(args) -> None:
    from .checkpoint import info
    from .fetch import resolve_model
    from .sharing import share

    out = Path(args.out)
    _placement(args)  # a bad --device/--dtype fails before anything else
    path = resolve_model(args.model)
    check_output(out, path, args.force)  # before the slow part, so a mistake costs nothing
    source = _plan_source(args)  # a bad plan file or option fails before the model loads
    text = None
    before = None
    if args.eval:
        from .data import load_text
        from .evaluate import perplexity

        text = load_text(args.text, split="eval")  # a missing text fails before the model loads
    path, model, tok = _load(args, path)
    if args.eval:
        _log("evaluating the original model ...")
        before = perplexity(model, tok, text, window=args.window, stride=args.window, max_tokens=args.eval_tokens)
    plan = _make_plan(source, model, tok, args)
    t0 = time.time()
    share(model, plan)
    del plan, source  # the model holds copies of the fitted tensors now (the config the record): not twice
    model.save_pretrained(out, force=args.force, tokenizer=tok)
    summary = info(out)
    summary["share_seconds"] = round(time.time() - t0, 2)
    summary["out"] = str(out.resolve())
    if args.eval:
        after = perplexity(model, tok, text, window=args.window, stride=args.window, max_tokens=args.eval_tokens)
        summary.update(perplexity_original=before["perplexity"], perplexity_shared=after["perplexity"],
                       eval_tokens=after["tokens"], eval_text=args.text)
    if args.json:
        _write_json(summary, None)
    else:
        print(_summary_table(summary))


def _summary_table(s: dict) -> str:
    saved_p = s["params_original"] - s["params_shared"]
    saved_b = s["bytes_original"] - s["bytes_shared"]
    rows = [
        ("method", s["method"] + (f" (kept {s['chosen']})" if s.get("chosen") else "")),
        ("units shared (borrowed)", f"{s['units_shared']} / {s['units_total']} ({s['unit']})"),
        *([("units pruned", f"{s['units_pruned']} / {s['units_total']}")] if s.get("units_pruned") else []),
        *([("units based", f"{s['units_based']} / {s['units_total']} ({s.get('based_rows', 'q/k/v')} "
                            f"rows as coefficients on {s['bases']} "
                            f"shared bases, ranks {', '.join(map(str, s.get('basis_ranks', [])))})")]
          if s.get("units_based") else []),
        *([("units refitted", f"{s['units_refitted']} / {s['units_total']} (o columns fitted by the method)")]
          if s.get("units_refitted") else []),
        ("parameters", f"{s['params_original']:,} -> {s['params_shared']:,} (-{saved_p:,}, "
                       f"-{100 * saved_p / s['params_original']:.2f} %)"),
        ("weight bytes", f"{s['bytes_original']:,} -> {s['bytes_shared']:,} (-{saved_b:,})"),
        ("checkpoint", f"{s.get('out', '')} ({s['checkpoint_bytes']:,} bytes of safetensors)"),
    ]
    if s.get("candidates"):
        rows.append(("candidates", f"chosen on the loss on {s.get('val_text')}"))
        if s.get("why"):
            rows.append(("  why", s["why"]))
        rows += [("  " + c["candidate"], _candidate_cell(c)) for c in s["candidates"]]
    if "perplexity_shared" in s:
        rows.append(("perplexity", f"{s['perplexity_original']:.3f} -> {s['perplexity_shared']:.3f} "
                                   f"(x{s['perplexity_shared'] / s['perplexity_original']:.3f}) on "
                                   f"{s['eval_tokens']:,} tokens of {s['eval_text']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _candidate_cell(c: dict) -> str:
    """An autoshare candidate's held-out losses (and perplexities) for the summary table."""
    cell = f"loss {c['val_loss']:.4f} (perplexity {math.exp(c['val_loss']):.2f})"
    if "calib_loss" in c:
        cell += f"; on the calibration text's kind {c['calib_loss']:.4f} ({math.exp(c['calib_loss']):.2f})"
    return cell + f", ratio {c['ratio']:.4g} of its units"


def cmd_info(args) -> None:
    from .checkpoint import info

    s = info(args.path)
    if args.json:
        _write_json(s, None)
    else:
        s["out"] = str(Path(args.path).resolve())
        print(_summary_table(s))


def _posttrain_placement(args):
    """posttrain's --device and --dtype. The Trainer trains float32 weights (Adam's small updates vanish in
    half precision) on the first visible GPU, or one GPU per process under `accelerate launch`; --dtype is
    the precision it computes in (bfloat16: mixed precision). float16 would need loss scaling, not set up here."""
    import torch

    from .devices import Placement

    place = _placement(args)
    if place.device.type == "cuda" and place.device.index:
        raise HeadshareError(f"--device {args.device}: posttrain trains on the first visible GPU (one per process under "
                         f"accelerate launch); choose GPU {place.device.index} with "
                         f"CUDA_VISIBLE_DEVICES={place.device.index} and --device cuda")
    if place.dtype == torch.float16:
        raise HeadshareError("--dtype float16: posttrain trains in float32 or in bfloat16 mixed precision; "
                         "use --dtype bfloat16 or float32")
    return Placement(place.device, place.dtype)


def _load_for_training(args, path: str, place):
    """The model in float32 on the device the Trainer trains on (its process's GPU under accelerate launch),
    after checking that weights, gradients and Adam's two moments (4 float32 copies) fit there."""
    import os

    import torch

    from .devices import Placement
    from .fetch import load_model

    device = place.device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # the Trainer's, under accelerate
    _check_fits([path], Placement(device, torch.float32), f"training {args.model} (float32 weights, gradients and "
                "Adam state)", copies=4, hint="train on a GPU with more free memory, or with --device cpu")
    model, tok = load_model(path, dtype=torch.float32, device=device)
    return path, model, tok


TRAIN_OPTIONS = ("mode", "lam", "constraint", "parts", "pull_until", "distill", "lr", "steps", "block_size",
                 "batch_size", "warmup_steps", "save_steps", "seed")


def _posttrain_config(args, place):
    """PostTrainConfig from the flags given; a flag not given keeps the config's default."""
    import torch

    from .posttrain import PostTrainConfig

    given = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
    return PostTrainConfig(**given, out=args.out, work_dir=args.work_dir, resume=args.resume, force=args.force,
                           keep_checkpoints=args.keep_checkpoints, use_cpu=place.device.type == "cpu",
                           bf16=place.dtype == torch.bfloat16)


def cmd_posttrain(args) -> None:
    from accelerate import PartialState

    from .checkpoint import info
    from .fetch import resolve_model
    from .posttrain import RECORD_FILE, posttrain

    # a bad value fails here, before the model loads
    place = _posttrain_placement(args)
    cfg = _posttrain_config(args, place)
    out = Path(args.out)
    path = resolve_model(args.model)
    check_output(out, path, args.force)
    source = _plan_source(args)
    if args.data.replace(" ", "") != "builtin:eval":  # (refused with its own message in training_blocks)
        from .data import load_text

        load_text(args.data, split="calib")  # a missing text fails before the model loads (parsed once, cached)
    path, model, tok = _load_for_training(args, path, place)
    plan = None
    if cfg.mode != "tune-only" or args.ratio is not None or args.plan:
        plan = _make_plan(source, model, tok, args)  # before training: the pairs are fixed from the start
        if plan.fitted and cfg.mode != "share-then-tune":
            # postshare learns its own compensation and tune-only is the reference: both train the original weights
            _log(f"{plan.method}: the plan's {len(plan.fitted)} fitted weights are not used; {cfg.mode} trains "
                 "the original ones")
    posttrain(model, tok, plan, args.data, cfg)
    if not PartialState().is_main_process:
        return
    record = json.loads((out / RECORD_FILE).read_text())
    last = record.get("final_lm_loss")
    d0, d1 = record["mean_pair_distance_fro_before"], record["mean_pair_distance_fro_after"]
    _log(f"{cfg.mode}: {record['steps']} steps in {record['train_seconds']:.0f} s on {record['processes']} "
         f"process(es)" + (f"; mean pair distance {d0:.4f} -> {d1:.4f}" if d0 is not None and d1 is not None else "")
         + (f"; last lm_loss {last:.4f}" if last is not None else ""))
    if record["shared"]:
        s = info(out)
        s["out"] = str(out.resolve())
        print(_summary_table(s))
    else:
        print(f"tune-only: plain checkpoint (no sharing) in {out.resolve()}")


def cmd_eval(args) -> None:
    from .data import load_text
    from .devices import offload
    from .evaluate import evaluate, lm_eval_tasks
    from .fetch import load_model, resolve_model

    place = _placement(args)  # a bad --device/--dtype fails before anything loads
    text = load_text(args.text, split="eval")  # a missing text fails before the model loads
    paths = [resolve_model(args.model)] + ([resolve_model(args.reference)] if args.reference else [])
    shared = any(_is_shared_checkpoint(p) for p in paths)
    if place.offload and shared:
        raise HeadshareError("--offload cannot run a shared checkpoint (its layers read weights of other layers); "
                         "drop --offload and use a device it fits on, or --device cpu")
    if place.offload and args.tasks:
        raise HeadshareError("--tasks: lm-eval does not run an offloaded model; drop --offload (or --tasks)")
    _check_fits(paths, place, args.model + (f" with reference {args.reference}" if args.reference else ""),
                hint="use --device cpu" if shared else "add --offload")
    model, tok = load_model(paths[0], dtype=place.dtype, device=place.load_device)
    if tok is None:
        raise HeadshareError(f"{args.model} has no tokenizer; save one beside the weights")
    reference = load_model(paths[1], dtype=place.dtype, device=place.load_device)[0] if args.reference else None
    if place.offload:
        model = offload(model, place.device)
        reference = offload(reference, place.device) if reference is not None else None
    stride = args.stride or args.window
    result = {"model": args.model, "text": args.text, "window": args.window, "stride": stride}
    if args.reference:
        result["reference"] = args.reference
    result.update(evaluate(model, tok, text, reference=reference, window=args.window,
                           stride=stride, max_tokens=args.max_tokens, batch_size=args.batch_size))
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        kw = dict(limit=args.limit, num_fewshot=args.num_fewshot, include_path=args.include_path,
                  include_defaults=not args.no_default_tasks)
        result["tasks"] = lm_eval_tasks(model, tok, tasks, **kw)
        if reference is not None:  # recovery = shared / original, as llm-compressor reports it
            result["reference_tasks"] = lm_eval_tasks(reference, tok, tasks, **kw)
            # every metric gets one; None where the reference scored 0 (no ratio to report)
            result["recovery"] = {t: {k: v / result["reference_tasks"][t][k] if result["reference_tasks"][t].get(k)
                                      else None for k, v in m.items() if not k.endswith("stderr")}
                                  for t, m in result["tasks"].items() if t in result["reference_tasks"]}
    if args.json:
        _write_json(result, None)
        return
    print(f"perplexity      {result['perplexity']:.4f} on {result['tokens']:,} tokens of {args.text} "
          f"(window {args.window}, stride {stride})")
    if "kl" in result:
        print(f"KL (ref||model) {result['kl']:.5f} nats/token; top-1 agreement {result['top1_agreement']:.4f}; "
              f"reference perplexity {result['reference_perplexity']:.4f}")
    for task, metrics in result.get("tasks", {}).items():
        print(f"{task:<15} " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("stderr")))


def cmd_bench(args) -> None:
    from .bench import markdown_table, parse_options, resolve_methods, run_bench
    from .fetch import resolve_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        ratios = [_ratio(r) for r in args.ratios.split(",") if r.strip()]
    except argparse.ArgumentTypeError as e:
        raise HeadshareError(f"--ratios: {e}") from None
    options = parse_options(args.option, resolve_methods(args.methods))
    place = _placement(args)
    _check_fits([resolve_model(args.model)], place, _twice(args.model), copies=2)
    texts = args.text or [_param_default(run_bench, "text")]
    rows = run_bench(args.model, ratios, args.methods, args.json, text=texts, calib=args.calib,
                     calib_tokens=args.calib_tokens, max_tokens=args.max_tokens, window=args.window,
                     seed=args.seed, options=options, resume=args.resume, force=args.force, md=args.md, plot=args.plot,
                     run_probe=not args.no_probe, device=place.device, dtype=place.dtype, offload=place.offload)
    print(markdown_table(rows), end="")
    _log(f"{len(rows)} rows in {args.json}" + (f"; table {args.md}" if args.md else "")
         + (f"; plot {args.plot}" if args.plot else ""))



def _head(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        layer, head = (int(x) for x in text.split(","))
    except ValueError:
        raise HeadshareError(f"--head must be LAYER,HEAD (two integers), got {text!r}") from None
    return layer, head


def cmd_report(args) -> None:
    from .fetch import resolve_model
    from .report import report

    out = Path(args.out)
    _placement(args)  # a bad --device/--dtype fails before anything else
    path = resolve_model(args.model)
    check_output(out, path, args.force)
    head = _head(args.head)  # a bad value fails before the model loads
    kw = _method_options(args, args.method)
    path, model, tok = _load(args, path, copies=2, hint="use --device cpu")  # the plan is measured on a copy
    if tok is None:
        raise HeadshareError(f"{path} has no tokenizer; the report runs the model on text and needs one")
    r = report(model, tok, out, text=args.text, windows=args.windows, window=args.window, head=head,
               top=args.top, ratio=args.ratio, method=args.method, plan_kwargs=kw, name=args.model)
    s, p = r.data["summary"], r.data["plan"]
    rho = ", ".join(f"{m} {v['spearman']:+.3f}" for m, v in r.data["weight_vs_attention"].items() if "spearman" in v)
    _log(f"best-match attention-map similarity: layers {s['layer_best_mean']:.3f}, heads {s['head_best_mean']:.3f} "
         f"(means); Spearman weight vs map: {rho}; {p['method']} at {p['ratio']}: {p['units_shared']} units shared, "
         f"{p['params_saved']:,} parameters saved; {r.data['timings']['total_s']:.0f} s")
    print(out.resolve() / "index.html")

# -- parser ----------------------------------------------------------------------------------------------
# Each default belongs to the config dataclass or the function that uses it; the parser reads it from there,
# so it is written once.

# the best method the project has, what `share` and `plan` run without --method
DEFAULT_METHOD = "autoshare"
# the paper's method: what `posttrain` (PostShare's pairs) and `report` (the paper's analysis) use
PAPER_METHOD = "directshare"


def _param_default(fn, name: str):
    """The default of parameter `name` of function `fn`."""
    return inspect.signature(fn).parameters[name].default


def _fmt(v) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


class _PostTrainDefault:
    """A PostTrainConfig default for help texts, read only when help is shown: posttrain imports the
    Trainer, too slow to load for every command."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        from .posttrain import PostTrainConfig

        return _fmt(PostTrainConfig.defaults()[self.name])


class _TrainOption(argparse._StoreAction):
    """A posttrain option that stays None unless given, so PostTrainConfig's default applies; its help shows
    that default as %(config_default)s."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config_default = _PostTrainDefault(self.dest)


def _add_plan_args(p: argparse.ArgumentParser, method: str = DEFAULT_METHOD) -> None:
    from .methods import CalibConfig

    default = (f"{method}, the best method headshare has; the paper's: --method {PAPER_METHOD}"
               if method == DEFAULT_METHOD else f"{method}, the paper's; the best headshare has: {DEFAULT_METHOD}")
    p.add_argument("--ratio", type=_ratio, help="fraction of all attention units to share, in [0, 1)")
    p.add_argument("--method", default=method, choices=list(METHODS),
                   help=f"how units are chosen (default: {default}): "
                        + "; ".join(f"{k}: {m.help}" for k, m in METHODS.items()))
    p.add_argument("-o", "--option", action="append", default=None, metavar="KEY=VALUE",
                   help="an option of the method's config, repeatable; " + _options_help())
    p.add_argument("--metric", default=None, help="match function for weight similarity: q, k, v, qk, qkv")
    p.add_argument("--unit", default=None,
                   help=f"what a unit is, {' or '.join(UNIT_KINDS)}: kv (default; a key/value head with its query heads) or query (one "
                        "query head; its key/value head stays with its layer)")
    p.add_argument("--seed", type=int, default=None, help="seed for randomised methods")
    p.add_argument("--calib", default=None,
                   help=f"calibration text for data-aware methods (default: {CalibConfig.defaults()['calib']})")
    p.add_argument("--calib-tokens", type=int, default=None,
                   help="calibration tokens for data-aware methods (default: the method's own)")


DEVICE_HELP = ("where the model runs: auto (the default: cuda:0 when torch sees a GPU, else cpu), cpu, cuda "
               "(= cuda:0) or cuda:N")
DTYPE_HELP = ("the weights' dtype, loaded straight into it: auto (the default: bfloat16 on a GPU that computes "
              "in it natively, else float32; float32 on a CPU), float32, bfloat16 or float16 (also fp32, bf16, fp16)")


def _add_device_args(p: argparse.ArgumentParser, offload: str | None = None, dtype_help: str = DTYPE_HELP) -> None:
    """--device and --dtype, and --offload with the help text `offload` where the command has it."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", help=dtype_help)
    if offload is not None:
        p.add_argument("--offload", action="store_true", help=offload)


OFFLOAD_HELP = ("for models larger than the GPU: the weights stay in CPU memory in their dtype and calibration "
                "brings one block at a time to --device and back (without it a model that does not fit is "
                "refused)")


def _options_help() -> str:
    return "; ".join(f"{name}: " + (", ".join(f"{k}={_fmt(v)}" for k, v in m.config.options().items()) or "none")
                     for name, m in METHODS.items())


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="download a built-in model and print its local directory")
    p.add_argument("alias", help="e.g. smollm2-135m")
    p.add_argument("--force", action="store_true", help="download and convert again")
    p.set_defaults(fn=cmd_fetch)


def _add_analyze(sub) -> None:
    from .similarity import analysis

    p = sub.add_parser("analyze", help="weight similarity of all attention units and their best earlier matches")
    p.add_argument("model", help="local model directory, hub id, or alias such as smollm2-135m")
    p.add_argument("--metric", default=_param_default(analysis, "metric"), help="q, k, v, qk or qkv (default %(default)s)")
    p.add_argument("--out", default=None, help="JSON file (default: stdout)")
    p.set_defaults(fn=cmd_analyze)


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help=f"choose which units to share (by default with {DEFAULT_METHOD}) and write "
                                    "the plan as JSON")
    p.add_argument("model")
    _add_plan_args(p)
    p.add_argument("--out", required=True, help="plan JSON file")
    _add_device_args(p, OFFLOAD_HELP)
    p.set_defaults(fn=cmd_plan)


def _add_share(sub) -> None:
    from .evaluate import perplexity

    p = sub.add_parser("share", help=f"share a model's attention units (by default with {DEFAULT_METHOD}) and save "
                                     "the smaller checkpoint")
    p.add_argument("model")
    _add_plan_args(p)
    p.add_argument("--plan", default=None, help="apply this plan JSON instead of making one")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--eval", action="store_true", help="measure perplexity before and after sharing")
    p.add_argument("--text", default="builtin", help="evaluation text for --eval (default: builtin corpus, eval part)")
    p.add_argument("--window", type=int, default=_param_default(perplexity, "window"),
                   help="evaluation window in tokens (default %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_device_args(p, OFFLOAD_HELP + "; --eval then runs on the CPU")
    p.set_defaults(fn=cmd_share)


def _add_posttrain(sub) -> None:
    p = sub.add_parser("posttrain", help="PostShare: train with the weight-similarity constraint, then share")
    p.add_argument("model")
    _add_plan_args(p, PAPER_METHOD)
    p.add_argument("--plan", default=None, help="pairs from this plan JSON instead of making one")
    p.add_argument("--data", default="builtin:calib",
                   help="training text: builtin:calib (default, ~40k tokens), pydoc (installed packages' "
                        "docstrings, millions of tokens), a text file, a saved or hub dataset (calib split)")
    # the training options stay None unless given: PostTrainConfig's defaults apply, and the help shows them
    p.add_argument("--mode", action=_TrainOption, choices=["postshare", "share-then-tune", "tune-only"],
                   help="postshare: constrain, then share; share-then-tune: share, then train the tied model; "
                        "tune-only: same training without constraint or sharing, the reference "
                        "(default %(config_default)s)")
    p.add_argument("--lambda", dest="lam", type=float, action=_TrainOption,
                   help="weight of the constraint (default %(config_default)s)")
    p.add_argument("--constraint", action=_TrainOption, choices=["fro", "mse", "prox"],
                   help="fro: Frobenius norms of the q, k, v differences; mse: mean squared differences; "
                        "prox: no loss term, every borrowing unit's tied tensors pulled towards its root after each step "
                        "and pruned units' o columns towards zero, reaching them at --pull-until (beyond the paper; "
                        "--lambda is then unused) (default %(config_default)s)")
    p.add_argument("--pull-until", type=float, action=_TrainOption,
                   help="prox: fraction of the steps by which the pull has closed the pairs (default %(config_default)s)")
    p.add_argument("--parts", action=_TrainOption, choices=["qkv", "qkvo"],
                   help="what the constraint pulls together: the paper's W_q, W_k, W_v (qkv) or the o "
                        "columns too (qkvo; all that sharing ties) (default %(config_default)s)")
    p.add_argument("--distill", type=float, action=_TrainOption,
                   help="weight in [0, 1] of distillation from the model as it came (KL of the next-token "
                        "distributions, per token; the LM loss gets the rest; keeps a frozen copy in memory; "
                        "beyond the paper) (default %(config_default)s)")
    for flag, tp, what in (("--lr", float, "peak learning rate, cosine decay"), ("--steps", int, "optimizer steps"),
                           ("--block-size", int, "tokens per training block"),
                           ("--batch-size", int, "blocks per step and process"),
                           ("--warmup-steps", int, "linear warm-up steps"),
                           ("--save-steps", int, "checkpoint every N steps")):
        p.add_argument(flag, type=tp, action=_TrainOption, help=what + " (default %(config_default)s)")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --force)")
    p.add_argument("--work-dir", default=None, help="Trainer checkpoints (default: OUT.work)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the work dir")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the work dir's checkpoints at the end")
    p.add_argument("--force", action="store_true", help="replace the output and start over in a used work dir")
    _add_device_args(p, dtype_help="the precision training computes in; the weights train in float32 (Adam's "
                                   "small steps vanish in half precision): auto (the default: bfloat16 mixed "
                                   "precision on a GPU that computes in it natively, else float32), float32 or "
                                   "bfloat16 (mixed precision)")
    p.set_defaults(fn=cmd_posttrain)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="what a shared checkpoint holds and what it saved")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)


def _add_eval(sub) -> None:
    from .evaluate import lm_eval_tasks, perplexity

    p = sub.add_parser("eval", help="perplexity of a model (shared or not), KL against a reference, lm-eval tasks")
    p.add_argument("model", help="model directory (a shared checkpoint too), hub id or alias")
    p.add_argument("--text", default="builtin", help="evaluation text: builtin (default), a file, a dataset")
    p.add_argument("--window", type=int, default=_param_default(perplexity, "window"),
                   help="tokens per window (default %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --window)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens of the text")
    p.add_argument("--batch-size", type=int, default=_param_default(perplexity, "batch_size"))
    p.add_argument("--reference", default=None, help="also report KL and top-1 agreement against this model")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, e.g. piqa,arc_easy")
    p.add_argument("--limit", type=float, default=None, help="at most this many documents per task")
    p.add_argument("--num-fewshot", type=int, default=_param_default(lm_eval_tasks, "num_fewshot"))
    p.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAML files")
    p.add_argument("--no-default-tasks", action="store_true",
                   help="skip indexing lm-eval's built-in tasks (when all --tasks are under --include-path)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_device_args(p, "for models larger than the GPU: the weights stay in CPU memory in their dtype and each "
                        "block goes to --device for its turn (unshared models only, and without --tasks; without it "
                        "a model that does not fit is refused)")
    p.set_defaults(fn=cmd_eval)


def _add_bench(sub) -> None:
    from .bench import run_bench

    def default(name):
        return _param_default(run_bench, name)

    p = sub.add_parser("bench", help="every method at every ratio: quality, size, memory and speed")
    p.add_argument("--model", default=default("model"))
    p.add_argument("--ratios", default=",".join(map(str, default("ratios"))),
                   help="comma-separated sharing ratios (default %(default)s)")
    p.add_argument("--methods", default=",".join(default("methods")),
                   help=f"comma-separated methods, or all ({', '.join(METHODS)}) (default %(default)s)")
    p.add_argument("--json", required=True, help="rows are appended to this JSON list as they finish")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json, add the missing ones")
    p.add_argument("--force", action="store_true", help="start over even if --json exists")
    p.add_argument("--md", default=None, help="also write the markdown table here")
    p.add_argument("--plot", default=None, help="also write a PNG of perplexity against parameters removed")
    p.add_argument("--text", action="append", default=None,
                   help=f"evaluation text, repeatable: every row is scored on each (in domain and out of it: "
                        f"--text builtin --text news); the first is the table's own column (default: "
                        f"{default('text')}, the built-in corpus's eval half)")
    p.add_argument("--calib", default=default("calib"), help="calibration text for data-aware methods")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (method default if unset)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many tokens")
    p.add_argument("--window", type=int, default=default("window"))
    p.add_argument("--seed", type=int, default=default("seed"), help="seed for randomised methods")
    p.add_argument("-o", "--option", action="append", default=None, metavar="[METHOD.]KEY=VALUE",
                   help="a method option for every method that has it (or for METHOD only), repeatable; "
                        + _options_help())
    p.add_argument("--no-probe", action="store_true", help="skip the memory and speed probe (faster)")
    p.add_argument("--threads", type=int, default=None, help="torch threads, also for the probe (default: torch's)")
    _add_device_args(p, OFFLOAD_HELP + "; evaluation then runs on the CPU")
    p.set_defaults(fn=cmd_bench)


def _add_report(sub) -> None:
    from .report import compute

    def default(name):
        return _param_default(compute, name)

    p = sub.add_parser("report", help="the paper's similarity analysis as a page: layers vs heads, weights vs "
                                      "attention maps, the sharing plan")
    p.add_argument("model", help="local model directory, hub id, or alias such as smollm2-135m")
    _add_plan_args(p, default("method"))
    p.set_defaults(ratio=default("ratio"))
    p.add_argument("--text", default=default("text"),
                   help="text for the attention maps (and for data-aware methods unless --calib): "
                        "builtin:calib, a file, a dataset (default %(default)s)")
    p.add_argument("--windows", type=int, default=default("windows"),
                   help="number of text windows (default %(default)s)")
    p.add_argument("--window", type=int, default=default("window"), help="tokens per window (default %(default)s)")
    p.add_argument("--head", default=None, help="LAYER,HEAD: the query head of the head-wise panel "
                                               "(default: head 0 of the last layer)")
    p.add_argument("--top", type=int, default=None, help="most similar heads to mark (default: heads per layer)")
    p.add_argument("--out", required=True, help="output directory: index.html, PNGs, report.json")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output directory")
    _add_device_args(p)
    p.set_defaults(fn=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="headshare", description="Head-wise weight sharing for LLM attention.")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_fetch, _add_analyze, _add_plan, _add_share, _add_posttrain, _add_info, _add_eval, _add_bench,
                _add_report):
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except USER_ERRORS as e:
        print(f"headshare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
