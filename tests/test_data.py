"""`headshare.data`: the built-in docstring corpus and its split, local files, datasets, token blocks."""

import json

import pytest
import torch

from headshare import data
from headshare.data import builtin_docstrings, builtin_text, load_text, pack_blocks, token_blocks, tokenize
from headshare.errors import HeadshareError


def test_builtin_split_is_disjoint_and_stable():
    calib, held_out = builtin_text("calib"), builtin_text("eval")
    assert len(calib) > 50_000 and len(held_out) > 50_000  # enough for 10k+ tokens each
    # docstrings themselves contain blank lines, so check whole docstrings, not paragraphs
    docs = builtin_docstrings()
    assert len(docs) == len(set(docs)) > 300
    in_calib = {d for d in docs if data.split_of(d) == "calib"}
    in_eval = set(docs) - in_calib
    assert in_calib and in_eval and not in_calib & in_eval
    assert all(d in calib for d in in_calib) and all(d in held_out for d in in_eval)
    # identical across calls, even with the caches cleared
    builtin_docstrings.cache_clear()
    builtin_text.cache_clear()
    assert builtin_text("calib") == calib and builtin_text("eval") == held_out


def test_builtin_corpus_does_not_depend_on_other_imports():
    """transformers patches logging.Logger; a fresh interpreter must still see the same corpus."""
    import hashlib
    import subprocess
    import sys

    import transformers  # noqa: F401  (the patching import)

    code = ("import hashlib, sys; from headshare.data import builtin_text as b; "
            "print('transformers' in sys.modules, hashlib.sha256((b('calib') + b('eval')).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    builtin_docstrings.cache_clear()
    builtin_text.cache_clear()
    here = hashlib.sha256((builtin_text("calib") + builtin_text("eval")).encode()).hexdigest()
    assert out == ["False", here]


def test_builtin_text_is_normalised():
    for doc in builtin_docstrings()[:200]:
        assert doc == doc.strip() and "\t" not in doc and "\n\n\n" not in doc
        assert all(line == line.rstrip() for line in doc.splitlines())
        assert len(doc.split()) >= data.MIN_WORDS


def test_builtin_sources():
    assert load_text("builtin") == builtin_text("eval")
    assert load_text("builtin", split="calib") == builtin_text("calib")
    assert load_text("builtin:calib", split="eval") == builtin_text("calib")
    with pytest.raises(ValueError, match="split must be one of"):
        builtin_text("train")


def test_local_text_and_json_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\nsecond line\n")
    assert load_text(str(tmp_path / "a.txt")) == "plain text\nsecond line\n"

    rows = [{"text": "first doc"}, {"text": "second doc", "id": 2}, {"other": 1}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")) == "first doc\n\nsecond doc"
    (tmp_path / "c.json").write_text(json.dumps(rows))
    assert load_text(str(tmp_path / "c.json")) == "first doc\n\nsecond doc"
    (tmp_path / "d.json").write_text(json.dumps({"text": ["x y", "z"]}))
    assert load_text(str(tmp_path / "d.json")) == "x y\n\nz"
    (tmp_path / "e.json").write_text(json.dumps([{"title": "no text"}]))
    with pytest.raises(ValueError, match="no record has a string 'text' field"):
        load_text(str(tmp_path / "e.json"))


@pytest.mark.parametrize("name", ["nope.txt", "nope.jsonl", "sub/nope", "./nope"])
def test_a_missing_text_path_is_refused_at_once(tmp_path, monkeypatch, name):
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("a missing path went to the hub"))
    source = str(tmp_path / name) if name.startswith("sub/") else name  # an absolute path, or relative ones
    with pytest.raises(FileNotFoundError, match="no such text file or directory"):
        load_text(source)


def test_saved_dataset_directory_and_data_file(tmp_path):
    from datasets import Dataset, DatasetDict

    dd = DatasetDict({
        "train": Dataset.from_dict({"text": ["train one", "train two"], "n": [1, 2]}),
        "test": Dataset.from_dict({"text": ["test one", "", "test two"], "n": [1, 2, 3]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_text(str(tmp_path / "dd")) == "test one\n\ntest two"  # eval -> test split
    assert load_text(str(tmp_path / "dd"), split="calib") == "train one\n\ntrain two"
    assert load_text(str(tmp_path / "dd"), split="train") == "train one\n\ntrain two"
    with pytest.raises(ValueError, match="none matches split 'validation'"):
        load_text(str(tmp_path / "dd"), split="validation")

    # a single Dataset whose only string column is not called "text"
    Dataset.from_dict({"body": ["only", "column"], "n": [1, 2]}).save_to_disk(str(tmp_path / "single"))
    assert load_text(str(tmp_path / "single")) == "only\n\ncolumn"

    dd["train"].to_csv(str(tmp_path / "f.csv"))
    assert load_text(str(tmp_path / "f.csv")) == "train one\n\ntrain two"


def test_unreachable_hub_dataset_gives_one_clear_line(monkeypatch):
    import datasets

    seen = {}

    def offline(path, name=None, **kw):
        seen["args"] = (path, name)
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError) as err:
        load_text("wikitext-2")
    assert seen["args"] == ("wikitext", "wikitext-2-raw-v1")
    assert "cannot load text 'wikitext-2'" in str(err.value) and "\n" not in str(err.value)


def test_tokenize_bos_policy(tiny_tokenizer):
    ids = tokenize(tiny_tokenizer, "the cat sat")
    assert ids.tolist() == tiny_tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    assert ids.dtype == torch.long
    # this tokenizer adds no BOS of its own, so none unless asked
    assert not data.adds_bos(tiny_tokenizer)
    assert tokenize(tiny_tokenizer, "the cat sat", bos=True).tolist() == [tiny_tokenizer.bos_token_id, *ids.tolist()]


def test_tokenize_adds_bos_when_the_tokenizer_does(tiny_tokenizer):
    from tokenizers import processors

    tok = tiny_tokenizer.backend_tokenizer
    with_bos = type(tok).from_str(tok.to_str())
    with_bos.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from transformers import PreTrainedTokenizerFast

    llama_like = PreTrainedTokenizerFast(tokenizer_object=with_bos, bos_token="<s>", eos_token="</s>",
                                         pad_token="<pad>", unk_token="<unk>")
    assert data.adds_bos(llama_like)
    assert tokenize(llama_like, "the cat")[0].item() == 1
    assert tokenize(llama_like, "the cat").tolist() == llama_like("the cat")["input_ids"]


def test_token_blocks_pack_without_padding(tiny_tokenizer):
    text = " ".join(["the sky is blue and the grass is green ."] * 5)  # 50 tokens
    ids = tokenize(tiny_tokenizer, text)
    assert len(ids) == 50
    blocks = token_blocks(tiny_tokenizer, text, 8)
    assert blocks.shape == (6, 8)
    assert torch.equal(blocks.flatten(), ids[:48])
    assert token_blocks(tiny_tokenizer, text, 8, max_blocks=2).shape == (2, 8)
    assert token_blocks(tiny_tokenizer, text, 64).shape == (0, 64)
    with pytest.raises(ValueError):
        token_blocks(tiny_tokenizer, text, 0)


def test_pydoc_reads_installed_packages_without_importing_them(tmp_path, monkeypatch):
    """Module, class and function docstrings of a package, split like the built-in corpus; test directories,
    short docstrings, unparsable files and every docstring of the built-in corpus are left out."""
    import sys

    name = "hs_fake_pkg_for_pydoc"
    taken = next(d for d in builtin_docstrings() if "\n" not in d)  # one line: reads back from a literal as it is
    docs = {
        "module": "A fake package whose docstrings make a small training corpus for the test.",
        "class": "A class that does nothing at all, documented with enough words to count.",
        "method": "Return nothing; this method exists only so that its docstring is collected here.",
        "function": "A module-level function with a docstring long enough to pass the word filter.",
    }
    pkg = tmp_path / name
    (pkg / "tests").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f'"""{docs["module"]}"""\nraise RuntimeError("pydoc must not import the package")\n')
    (pkg / "core.py").write_text(
        f'class Thing:\n    """{docs["class"]}"""\n\n    def go(self):\n        """{docs["method"]}"""\n\n\n'
        f'def helper():\n    """{docs["function"]}"""\n\n\ndef short():\n    """Too short."""\n\n\n'
        f'def copied():\n    {taken!r}\n')
    (pkg / "tests" / "test_core.py").write_text('"""A test module docstring that must never reach the corpus text."""\n')
    (pkg / "broken.py").write_text('"""A docstring in a file that does not parse at all, so it is skipped."""\ndef (:\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    calib, held_out = load_text(f"pydoc:{name}", split="calib"), load_text(f"pydoc:{name}", split="eval")
    assert name not in sys.modules
    for doc in docs.values():
        assert (doc in calib) != (doc in held_out)
        assert doc in (calib if data.split_of(doc) == "calib" else held_out)
    for text in (calib, held_out):
        assert "Too short" not in text and "test module" not in text and "does not parse" not in text
        assert taken not in text  # never the built-in evaluation text, nor its calibration half
    with pytest.raises(ValueError, match="not installed"):
        data.pydoc_text("calib", ("hs_no_such_package_anywhere",))


@pytest.mark.slow
def test_pydoc_default_is_large():
    """The default pydoc corpus (installed torch, transformers, ...): over 20x the built-in half (about a
    minute to parse on 2 cores)."""
    calib = load_text("pydoc", split="calib")
    assert len(calib.split()) > 20 * len(builtin_text("calib").split())


def test_pack_blocks_is_the_one_packer():
    ids = torch.arange(50)
    assert torch.equal(pack_blocks(ids, 8), ids[:48].view(6, 8))
    assert pack_blocks(ids, 8, max_blocks=2).shape == (2, 8)
    assert pack_blocks(ids, 64).shape == (0, 64)
    assert torch.equal(pack_blocks(ids, 64, short=True), ids[None])  # one shorter block instead of none
    assert pack_blocks(ids[:0], 8, short=True).shape == (0, 8)
    with pytest.raises(HeadshareError, match="block_size"):
        pack_blocks(ids, 0)


def test_code_text_is_whole_files_split_by_the_builtin_rule():
    files = data.code_files()
    assert len(files) > 50
    calib, held_out = data.code_text("calib"), data.code_text("eval")
    assert load_text("code:calib") == calib and load_text("code") == held_out
    assert load_text("code", split="calib") == calib
    for f in files:  # every file whole in exactly one half
        assert (f in calib) != (f in held_out) or f in calib and f in held_out and len(f) < 200
    assert {data.split_of(f) for f in files} == {"calib", "eval"}
    assert "import " in held_out and "def " in held_out
    # the code is of packages the docstring corpus does not read: no docstring of it comes with the code
    assert not set(data.CODE_PACKAGES) & {m.split(".")[0] for m in data.BUILTIN_MODULES}


def test_news_text_splits_the_fetched_articles(tmp_path, monkeypatch):
    import headshare.fetch

    articles = [f"article {i} says something about the weather in town number {i} today ." for i in range(40)]
    (tmp_path / "news.txt").write_text("\n".join(articles) + "\n\n")
    monkeypatch.setattr(headshare.fetch, "fetch_text", lambda name, progress=True: tmp_path / "news.txt")
    data.news_articles.cache_clear()
    try:
        assert data.news_articles() == tuple(articles)
        calib, held_out = load_text("news:calib").split("\n\n"), load_text("news").split("\n\n")
        assert sorted(calib + held_out) == sorted(articles) and not set(calib) & set(held_out)
        assert all(data.split_of(a) == "eval" for a in held_out)
    finally:
        data.news_articles.cache_clear()
    with pytest.raises(HeadshareError, match="split must be one of"):
        load_text("code:test")
