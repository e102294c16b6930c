"""`headshare.evaluate`: perplexity, model comparison and lm-eval wiring, against computations by hand."""

import math
import random

import pytest
import torch
from conftest import QUESTIONS, write_task

from headshare.data import load_text, tokenize
from headshare.evaluate import compare, evaluate, lm_eval_tasks, perplexities, perplexity, windows


def random_text(tokenizer, n_words: int, seed: int = 0) -> str:
    """Random words of the tiny tokenizer's vocabulary: one token each."""
    words = sorted(w for w in tokenizer.get_vocab() if not w.startswith("<"))
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n_words))


def reference_perplexity(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The textbook sliding-window loop (labels masked with -100), cross-entropy by hand in float64."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        inp = ids[begin:end]
        labels = inp.clone()
        labels[:-trg_len] = -100
        with torch.no_grad():
            logits = model(inp[None]).logits[0].double()
        logprobs = logits - logits.logsumexp(-1, keepdim=True)
        for t in range(1, len(inp)):  # token t is predicted by position t-1
            if labels[t] != -100:
                nll -= logprobs[t - 1, labels[t]].item()
                count += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("n", [2, 7, 64, 65, 100])
@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (16, 1), (2, 2), (8, 7)])
def test_windows_score_every_token_once(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert begin < first < end and end - begin <= window
        scored += range(first, end)
    if stride == window:  # non-overlapping: the first token of each window goes unscored
        assert scored == [t for t in range(n) if t % window]
    else:
        assert scored == list(range(1, n))


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError):
        windows(10, 8, 9)
    with pytest.raises(ValueError):
        windows(1, 8, 8)


@pytest.mark.parametrize("window,stride", [(32, 32), (32, 12), (32, 1)])
def test_perplexity_matches_hand_computation(tiny_llama, tiny_tokenizer, window, stride):
    model, text = tiny_llama(), random_text(tiny_tokenizer, 90)
    ids = tokenize(tiny_tokenizer, text)
    assert len(ids) == 90
    expected, count = reference_perplexity(model, ids, window, stride)
    got = perplexity(model, tiny_tokenizer, text, window=window, stride=stride, progress=False)
    assert got["tokens"] == count == (90 - math.ceil(90 / window) if stride == window else 89)
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert got["nll"] == pytest.approx(math.log(expected), rel=1e-5)
    # batching equal-length windows changes nothing
    batched = perplexity(model, tiny_tokenizer, text, window=window, stride=stride, batch_size=3, progress=False)
    assert batched["tokens"] == count and batched["perplexity"] == pytest.approx(got["perplexity"], rel=1e-5)


def test_perplexities_score_each_eval_half(tiny_llama, tiny_tokenizer):
    model = tiny_llama()
    got = perplexities(model, tiny_tokenizer, texts=("builtin", "code"), max_tokens=96)
    assert list(got) == ["builtin", "code"]
    for name in got:
        one = perplexity(model, tiny_tokenizer, load_text(name, "eval"), max_tokens=96, progress=False)
        assert got[name] == one["perplexity"]
    rounded = perplexities(model, tiny_tokenizer, texts=("builtin",), max_tokens=96, digits=2)
    assert rounded["builtin"] == round(got["builtin"], 2)


def test_max_tokens_truncates(tiny_llama, tiny_tokenizer):
    model, text = tiny_llama(), random_text(tiny_tokenizer, 150)
    got = perplexity(model, tiny_tokenizer, text, window=32, stride=32, max_tokens=64, progress=False)
    expected, count = reference_perplexity(model, tokenize(tiny_tokenizer, text)[:64], 32, 32)
    assert got["tokens"] == count == 62 and got["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_compare_with_itself_is_zero(tiny_llama, tiny_tokenizer):
    model, text = tiny_llama(), random_text(tiny_tokenizer, 120)
    got = compare(model, model, tiny_tokenizer, text, window=32, stride=16, progress=False)
    assert abs(got["kl"]) < 1e-9 and got["top1_agreement"] == 1.0
    ppl = perplexity(model, tiny_tokenizer, text, window=32, stride=16, progress=False)
    assert got["tokens"] == ppl["tokens"] == 119
    assert got["perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-6)
    assert got["reference_perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-6)


def test_compare_with_perturbed_model(tiny_llama, tiny_tokenizer):
    reference, model, text = tiny_llama(), tiny_llama(), random_text(tiny_tokenizer, 120)
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        w.add_(torch.randn_like(w) * 0.5)
        model.lm_head.weight.mul_(3.0)  # sharpen: argmaxes stay, probabilities move
    got = evaluate(model, tiny_tokenizer, text, reference=reference, window=32, stride=32, progress=False)
    assert got["kl"] > 1e-4 and 0.0 <= got["top1_agreement"] <= 1.0

    # the KL by hand over the same positions
    ids = tokenize(tiny_tokenizer, text)
    kl, n = 0.0, 0
    for begin, end, first in windows(len(ids), 32, 32):
        with torch.no_grad():
            lp = model(ids[None, begin:end]).logits[0].double().log_softmax(-1)
            lq = reference(ids[None, begin:end]).logits[0].double().log_softmax(-1)
        rows = slice(first - begin - 1, end - begin - 1)
        kl += (lq[rows].exp() * (lq[rows] - lp[rows])).sum().item()
        n += end - first
    assert got["kl"] == pytest.approx(kl / n, rel=1e-9)
    assert set(evaluate(model, tiny_tokenizer, text, window=32, progress=False)) >= {"perplexity", "nll", "tokens"}




def hand_scored_accuracy(model, tokenizer) -> tuple[float, float]:
    """Score each choice's log-likelihood after the prompt, as lm-eval defines it, without lm-eval."""
    acc = acc_norm = 0
    for question, choices, gold in QUESTIONS:
        context = f"question : {question} answer :"
        ctx = tokenizer(context)["input_ids"]
        lls = []
        for choice in choices:
            whole = tokenizer(context + " " + choice)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logprobs = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            lls.append(sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        acc += max(range(len(choices)), key=lambda i: lls[i]) == gold
        # lm-eval normalises by the length in characters of the choice (with its leading space)
        acc_norm += max(range(len(choices)), key=lambda i: lls[i] / len(" " + choices[i])) == gold
    return acc / len(QUESTIONS), acc_norm / len(QUESTIONS)


def test_lm_eval_local_task_matches_hand_scoring(tmp_path, tiny_llama, tiny_tokenizer):
    model = tiny_llama(seed=3)
    results = lm_eval_tasks(model, tiny_tokenizer, ["tiny_mc"], include_path=write_task(tmp_path),
                            include_defaults=False)
    acc, acc_norm = hand_scored_accuracy(model, tiny_tokenizer)
    got = results["tiny_mc"]
    assert 0.0 <= got["acc"] <= 1.0 and 0.0 <= got["acc_norm"] <= 1.0
    assert got["acc"] == pytest.approx(acc) and got["acc_norm"] == pytest.approx(acc_norm)
    assert "acc_stderr" in got
