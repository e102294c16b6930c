"""`autoshare`: make a few candidate plans and keep the one whose shared model has the least loss on held-out
calibration text.

Which method and unit kind does best depends on the model and the ratio, and the layer-local errors that the
methods minimise cannot tell (BENCHMARKS.md: on SmolLM2 `choiceshare` on query heads is best at 10-30 % and
`basisshare` on key/value units at 50 %; on Gemma 3 270M `choiceshare` at 10 % and `basisshare` at 30-50 %).
The whole model's loss can. Every candidate ("METHOD@UNIT") gets the same parameter budget, the parameters that
`ratio` of this config's units hold (a candidate on smaller units removes the fewest units that reach it), fits on
the same first `calib_tokens` tokens of the calibration text, and is scored as the model it makes (emulated one
block at a time, `calibration.plan_applied`: no copy of the model) on the `val_tokens` tokens that follow them:
text no fit has seen, and never the evaluation split; or, with `val`, on text of another kind (the calib half
of another source: a choice made on docstrings alone picks what fits docstrings). The plan it returns is the winner's, with every candidate's score in its notes (`notes["candidates"]`).

    >>> plan = headshare.make_plan(model, AutoShareConfig(ratio=0.3), tokenizer=tok)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace

import torch

from ..arch import UNIT_KINDS, layout_of
from ..config import check, is_integer
from ..errors import HeadshareError
from ..plan import new_plan, units_for_ratio
from .base import METHODS, CalibConfig, make_config, make_plan, register_method, split_method
from .calibration import held_out_loss, source_ids
from .fitshare import shared_pruning_costs

# the two sharing methods that won somewhere in BENCHMARKS.md, and the two prunings, so that autoshare never
# keeps a plan that scores worse than pruning on its validation text; each is a registered method and a unit kind
CANDIDATES = "choiceshare@query,basisshare@kv,fitprune@kv,prune@kv"
VAL_TOKENS = 4096  # held-out calibration tokens each candidate is scored on (the fits read the calib_tokens before)
BLOCK = 512


@dataclass
class AutoShareConfig(CalibConfig):
    candidates: str = CANDIDATES  # comma list of METHOD@UNIT (UNIT: kv or query); each fits on calib_tokens
    val_tokens: int = VAL_TOKENS  # scored on the calibration tokens after the first calib_tokens
    # a text source (or SOURCE+SOURCE mix), calib halves, to score on instead: text of another kind than the
    # calibration text chooses for text the fits never saw the like of ("" = the calibration text, as above)
    val: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "val_tokens", is_integer(self.val_tokens) and self.val_tokens >= 2, "an integer >= 2")
        check(self, "val", isinstance(self.val, str) and not any(
            s.strip().endswith(":eval") for s in self.val.split("+")),
            "a text source whose calib half is read (the eval halves stay for evaluation), or empty")
        try:
            names = parse_candidates(self.candidates) if isinstance(self.candidates, str) else []
        except HeadshareError:  # a unit that is no unit kind: refused below, as an unknown method is
            names = [(None, None)]
        check(self, "candidates", bool(names), "a comma list of METHOD@UNIT")
        for method, unit in names:
            check(self, "candidates", method in METHODS and method != "autoshare" and unit in UNIT_KINDS,
                  f"registered methods other than autoshare, each with @UNIT ({', '.join(UNIT_KINDS)})")


def parse_candidates(text: str) -> list[tuple[str, str]]:
    """"basisshare@kv,choiceshare@query" as [(method, unit)]; a name without @ is on the default unit."""
    out = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        method, unit = split_method(name)
        out.append((method, unit or "kv"))
    return out


def candidate_ratio(model, budget: int, unit: str) -> float:
    """The ratio of `unit` units whose parameters first reach `budget` (exactly what `units_for_ratio` reads)."""
    layout = layout_of(model.config, unit)
    n = math.ceil(budget / layout.unit_params())
    if n >= layout.units_total:
        raise HeadshareError(f"a budget of {budget:,} parameters needs {n} of the {layout.units_total} {unit} units")
    return n / layout.units_total


def validation_ids(tokenizer, cfg: AutoShareConfig) -> torch.Tensor:
    """(n, block) token ids the candidates are scored on: `val_tokens` of `cfg.val`, or where that is empty
    the ones after the first `calib_tokens` of `cfg.calib` (per source of a mix, an equal share each)."""
    from ..data import pack_blocks

    parts = source_ids(tokenizer, cfg.val or cfg.calib)
    skip = 0 if cfg.val else cfg.calib_tokens // len(parts)
    share = cfg.val_tokens // len(parts)
    for name, ids in parts:
        if len(ids) < skip + share:
            fits = f"autoshare fits on the first {skip:,} tokens and " if skip else "autoshare "
            raise HeadshareError(f"text {name!r} has {len(ids):,} tokens; {fits}scores on the next "
                                 f"{share:,} (val_tokens={cfg.val_tokens:,}): give a longer text or fewer tokens")
    block = min(BLOCK, share)
    return torch.cat([pack_blocks(ids[skip:skip + share], block) for _, ids in parts])


@register_method("autoshare", AutoShareConfig, "make each candidate plan (default: choiceshare on query heads, "
                                               "basisshare, fitprune and prune on key/value units) at the same "
                                               "parameters and keep the one with the least loss on held-out text",
                 needs_tokenizer=True)
def autoshare(model, cfg: AutoShareConfig, tokenizer=None, progress: bool = False, device=None):
    """The candidate plan whose shared model scores best on held-out calibration text (module docstring)."""
    from tqdm.auto import tqdm

    layout = layout_of(model.config, cfg.unit)
    n = units_for_ratio(cfg.ratio, layout)
    if n == 0:
        return new_plan(model, "autoshare", cfg.ratio, unit_kind=cfg.unit)
    budget = n * layout.unit_params()
    val = validation_ids(tokenizer, cfg)
    # in domain beside it: a choice made on another kind of text still reports what it costs on the kind of
    # text it was fitted on (the calibration text after calib_tokens)
    same = validation_ids(tokenizer, replace(cfg, val="")) if cfg.val else None
    scores, best = [], None
    names = parse_candidates(cfg.candidates)
    skipped = []
    # fitprune and basisshare's fixed split weigh the same pruning costs on this same model: computed once
    with shared_pruning_costs():
        for method, unit in tqdm(names, desc="candidates", disable=not progress, unit="plan"):
            t0 = time.perf_counter()
            options = METHODS[method].config.options()
            calib = {k: getattr(cfg, k) for k in ("calib", "calib_tokens") if k in options}  # data-free ones have none
            try:  # a shallow model may not hold the budget in this candidate's units: the others still run
                ratio = candidate_ratio(model, budget, unit)
                units_for_ratio(ratio, layout_of(model.config, unit))
            except ValueError as e:
                skipped.append({"candidate": f"{method}@{unit}", "reason": str(e)})
                if progress:
                    print(f"headshare: autoshare skips {method}@{unit}: {e}", file=sys.stderr, flush=True)
                continue
            sub = make_config(method, ratio, unit=unit, **calib)
            plan = make_plan(model, sub, tokenizer=tokenizer, progress=progress, device=device)
            seconds = time.perf_counter() - t0
            loss = held_out_loss(model, val, plan, device)  # the shared model, emulated one block at a time
            scores.append({"candidate": f"{method}@{unit}", "ratio": sub.ratio, "val_loss": round(loss, 6),
                           **({"calib_loss": round(held_out_loss(model, same, plan, device), 6)} if same is not None else {}),
                           "plan_seconds": round(seconds, 1)})
            if best is None or loss < best[0]:
                best = (loss, plan, scores[-1]["candidate"])
            del plan  # a losing candidate's fitted tensors (a layer's worth each) go before the next one is made
    if best is None:
        raise HeadshareError("no autoshare candidate can remove this budget on this model: "
                         + "; ".join(f"{s['candidate']}: {s['reason']}" for s in skipped) + "; lower the ratio")
    _, plan, chosen = best
    plan.notes = {**plan.notes, "chosen": chosen, "why": why_chosen(scores, chosen), "candidates": scores,
                  "val_tokens": int(val.numel()),
                  "val_text": cfg.val or f"{cfg.calib} (after calib_tokens)",
                  "candidate_config": plan.config, **({"skipped": skipped} if skipped else {})}
    return plan


UNIT_WORDS = {"kv": "key/value units", "query": "query heads"}  # one per arch.UNIT_KINDS


def why_chosen(scores: list[dict], chosen: str) -> str:
    """One sentence on why `chosen` was kept among the scored candidates: which kind of unit, by how much its
    held-out perplexity beats the best candidate on the other kind, and the runner-up of its own kind."""
    loss = {s["candidate"]: s["val_loss"] for s in scores}
    unit = chosen.partition("@")[2]
    other = [c for c in loss if c.partition("@")[2] != unit]
    same = [c for c in loss if c.partition("@")[2] == unit and c != chosen]
    other_kind = next(u for u in UNIT_KINDS if u != unit)
    text = f"{UNIT_WORDS[unit]}: {chosen} has the least held-out loss ({loss[chosen]:.4f})"
    for label, pool in ((f"the best on {UNIT_WORDS[other_kind]}", other), (f"the next on {UNIT_WORDS[unit]}", same)):
        if pool:
            rival = min(pool, key=loss.get)
            gap = 100 * (math.exp(loss[rival] - loss[chosen]) - 1)
            text += f"; perplexity {gap:.1f} % below {label}, {rival} ({loss[rival]:.4f})"
    if not other:
        text += f"; no candidate on {UNIT_WORDS[other_kind]} ran"
    return text

