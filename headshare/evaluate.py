"""Measure what sharing costs: perplexity, divergence from the original model, and lm-eval tasks.

Perplexity and the comparison against a reference model run on any text (see `headshare.data`)
with the usual sliding windows; benchmark tasks go through lm-evaluation-harness, which takes the
in-memory model as it is.

    >>> text = load_text("builtin:eval")                                  # doctest: +SKIP
    >>> evaluate(shared, tokenizer, text, reference=original)["kl"]       # doctest: +SKIP

Tokenisation: the whole text is tokenised once, without special tokens, and BOS is put in front
only when the tokenizer itself would add it by default (`headshare.data.tokenize`), so the models
see text as they were trained to: Llama-2 gets its BOS, SmolLM2 and GPT-2 get none.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from headshare.data import load_text, tokenize
from headshare.devices import execution_device

from .errors import HeadshareError

IN_AND_OUT = ("builtin", "news", "code")  # the calibration text's kind (docstrings) and two kinds off it
CHUNK = 256  # positions per float64 log-softmax in compare(): bounds memory at CHUNK x vocab x 8 bytes


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over n tokens as (begin, end, first_scored).

    Window [begin, end) is fed to the model and scores the tokens first_scored..end-1, each from
    the logits one position earlier. Every token but the very first is scored exactly once: the
    first window scores all but its first token, later ones only what the previous window did not
    reach, with the tokens before it as context. With stride == window the windows do not overlap
    and the first token of each goes unscored (it has no context inside its window).
    """
    if window < 2 or not 1 <= stride <= window:
        raise HeadshareError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    if n < 2:
        raise HeadshareError(f"need at least 2 tokens to score, got {n}")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def _device(model) -> torch.device:
    # an offloaded model (`headshare.devices.offload`) keeps its parameters on the meta device between calls
    return execution_device(model)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids.to(_device(model)))
    return out.logits if hasattr(out, "logits") else out[0]


def _batches(ids: torch.Tensor, wins, batch_size: int) -> Iterator[tuple[torch.Tensor, list]]:
    """Group consecutive windows of equal length into batches (no padding needed)."""
    group: list = []
    for w in wins:
        if group and (len(group) == batch_size or w[1] - w[0] != group[0][1] - group[0][0]):
            yield torch.stack([ids[b:e] for b, e, _ in group]), group
            group = []
        group.append(w)
    if group:
        yield torch.stack([ids[b:e] for b, e, _ in group]), group


def _prepare(tokenizer, text: str, window: int, stride: int | None, max_tokens: int | None):
    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids, windows(len(ids), window, window if stride is None else stride)


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    text: str,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of `model` on `text` with sliding windows (see `windows`); stride defaults to window.

    Returns a dict with `perplexity`, `nll` (mean negative log-likelihood per scored token, nats),
    `tokens` (number of scored tokens), `windows` and `seconds`.

    >>> perplexity(model, tokenizer, load_text("builtin:eval"))["perplexity"]   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    ids, wins = _prepare(tokenizer, text, window, stride, max_tokens)
    total, count = 0.0, 0
    bar = tqdm(total=len(wins), desc="perplexity", disable=not progress, unit="win")
    for batch, group in _batches(ids, wins, batch_size):
        logits = _logits(model, batch)  # (B, T, V)
        for i, (b, e, first) in enumerate(group):
            pred = logits[i, first - b - 1 : e - b - 1].float()  # logits that predict tokens first..e-1
            target = batch[i, first - b : e - b].to(pred.device)
            total += F.cross_entropy(pred, target, reduction="sum").double().item()
            count += e - first
        bar.update(len(group))
    bar.close()
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "windows": len(wins),
            "seconds": time.perf_counter() - t0}


def perplexities(model, tokenizer, texts=IN_AND_OUT, max_tokens: int | None = None, digits: int | None = None
                  ) -> dict[str, float]:
    """{source: perplexity on its eval half} for each of `texts` (sources `load_text` reads), no progress bars:
    the in- and out-of-domain scores that every experiment reports side by side, `digits` rounded if given."""
    out = {}
    for name in texts:
        ppl = perplexity(model, tokenizer, load_text(name, "eval"), max_tokens=max_tokens, progress=False)["perplexity"]
        out[name] = ppl if digits is None else round(ppl, digits)
    return out


@torch.inference_mode()
def compare(
    model,
    reference,
    tokenizer,
    text: str,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """How far `model`'s next-token distributions are from `reference`'s on the same windows.

    Returns `kl` (mean KL(reference || model) per scored position, nats), `top1_agreement` (fraction
    of positions where both argmaxes agree), and from the same pass `perplexity`, `nll`, `tokens`
    of `model` and `reference_perplexity`. Computed in float64 on chunks of positions.

    >>> compare(shared, original, tokenizer, load_text("builtin:eval"))["kl"]   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    ids, wins = _prepare(tokenizer, text, window, stride, max_tokens)
    kl = agree = nll = ref_nll = 0.0
    count = 0
    bar = tqdm(total=len(wins), desc="compare", disable=not progress, unit="win")
    for batch, group in _batches(ids, wins, batch_size):
        logits, ref_logits = _logits(model, batch), _logits(reference, batch)
        for i, (b, e, first) in enumerate(group):
            target = batch[i, first - b : e - b].to(logits.device)
            for s in range(first - b - 1, e - b - 1, CHUNK):  # s: logit position predicting s+1
                stop = min(s + CHUNK, e - b - 1)
                lp = F.log_softmax(logits[i, s:stop].double(), dim=-1)  # (C, V)
                lq = F.log_softmax(ref_logits[i, s:stop].double().to(lp.device), dim=-1)
                t = target[s - (first - b - 1) : stop - (first - b - 1)]
                kl += (lq.exp() * (lq - lp)).sum().item()
                agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
                nll -= lp.gather(-1, t[:, None]).sum().item()
                ref_nll -= lq.gather(-1, t[:, None]).sum().item()
            count += e - first
        bar.update(len(group))
    bar.close()
    return {"kl": kl / count, "top1_agreement": agree / count, "perplexity": math.exp(nll / count),
            "nll": nll / count, "reference_perplexity": math.exp(ref_nll / count), "tokens": count,
            "windows": len(wins), "seconds": time.perf_counter() - t0}


def evaluate(model, tokenizer, text: str, reference=None, **kw) -> dict:
    """Perplexity of `model` on `text`, plus `kl` and `top1_agreement` when a reference is given.

    Keyword arguments go to `perplexity` / `compare` (window, stride, max_tokens, ...).
    """
    if reference is None:
        return perplexity(model, tokenizer, text, **kw)
    return compare(model, reference, tokenizer, text, **kw)


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    num_fewshot: int = 0,
    batch_size: int = 1,
    include_path: str | None = None,
    include_defaults: bool = True,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness tasks on an in-memory model.

    Args:
        tasks: task names known to lm-eval, or defined by YAML files under `include_path`.
        limit: at most this many documents per task (a float < 1 is a fraction).
        include_path: a folder of task YAML files to add to lm-eval's own.
        include_defaults: index lm-eval's ~14k built-in task files (10-30 s); False when all tasks
            are under include_path.

    Returns {task: {metric: value}}, e.g. {"piqa": {"acc": 0.61, "acc_stderr": 0.01, "acc_norm": ...}}
    (metric names without lm-eval's ",none" filter suffix).

    >>> lm_eval_tasks(model, tokenizer, ["piqa"], limit=200)   # doctest: +SKIP
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                          task_manager=manager, log_samples=False)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        results[task] = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results[task][name if filt in ("", "none") else f"{name},{filt}"] = float(value)
    return results
