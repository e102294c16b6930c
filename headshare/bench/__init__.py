"""The quality benchmark: every plan method at the same number of removed attention units.

For each (method, ratio) a fresh copy of the model gets the method's plan and is shared; then

- quality: perplexity on the evaluation text, and KL divergence and top-1 agreement of the
  next-token distributions against the original model (`headshare.evaluate.compare`); with several
  texts (in domain and out of it), each one's in the row's "texts" and a column of the table;
- size: attention and total parameters removed, unique weight bytes in memory, and the bytes of
  the checkpoint `save_pretrained` writes (all files, no tokenizer);
- cost: in a fresh Python process that loads that checkpoint (`python -m headshare.bench probe DIR`),
  the median time of three 512-token forwards (`prefill_s`), the median time of one decoded token
  with the KV cache after a 128-token prompt (`decode_s`), the resident memory after loading
  (`rss_after_load_bytes`; memory-mapped weights count only once touched) and its peak while
  running them (`peak_rss_bytes`: python, torch, the weights, activations and cache).
  A fresh process because a process's peak RSS only ever grows: measured in the benchmark's own
  process it would report the largest model seen so far. The peak is reset after loading
  (/proc/self/clear_refs), so loader transients do not count; `peak_excludes_load` says whether
  the reset worked.

Ratio 0 is the unchanged model, measured once and reused for every method. Rows are appended to
the JSON file as they finish, so a crash keeps them and `resume=True` carries on.


Modules, one step each: `settings` (method names, options, each row's config), `reference` (the cached
reference model), `probe` (memory and speed in a fresh process; `__main__` is that process), `measure`
(one row), `rows` (the JSON file), `tables` (markdown, sharing against pruning), `plot` and `run`
(`run_bench`, the whole benchmark).

    >>> rows = run_bench("smollm2-135m", [0, 0.3], ["directshare", "prune"], "out.json")   # doctest: +SKIP
"""

from .measure import attention_params, measure
from .plot import plot_rows
from .probe import PROBE_KEYS, probe, probe_checkpoint
from .reference import CachedReference
from .rows import read_rows, write_rows
from .run import run_bench
from .settings import (
    DEFAULT_METHODS,
    DEFAULT_RATIOS,
    SETTING_KEYS,
    bench_config,
    parse_options,
    resolve_methods,
    split_method,
)
from .tables import (
    PRUNING,
    budget_groups,
    group_ratio,
    is_pruning,
    markdown_table,
    perplexity_on,
    sharing_gap,
)

__all__ = [
    "DEFAULT_METHODS", "DEFAULT_RATIOS", "PROBE_KEYS", "PRUNING", "SETTING_KEYS", "CachedReference",
    "attention_params", "bench_config", "budget_groups", "group_ratio", "is_pruning", "markdown_table", "measure",
    "parse_options", "perplexity_on", "plot_rows", "probe", "probe_checkpoint", "read_rows", "resolve_methods",
    "run_bench",
    "sharing_gap", "split_method", "write_rows",
]
