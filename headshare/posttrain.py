"""PostShare: continue training with a weight-similarity constraint on the pairs a plan selected, then share them.

The paper's second method (Cao et al., 2024, arXiv:2402.11819). The pairs are fixed before training by any plan method;
training runs on plain text with

    loss = (1 - lambda) * LM loss + lambda * L_w
    L_w  = mean over selected pairs of ||W_q - W_q'||_F + ||W_k - W_k'||_F + ||W_v - W_v'||_F

(or the mean squared difference with `constraint="mse"`), and afterwards `headshare.share` ties the
pulled-together pairs exactly as DirectShare does. W_o and biases are not in L_w (as in the paper);
they are shared all the same, so the borrowing unit ends up reading its source's o columns, which
training never brought near its own. `parts="qkvo"` (beyond the paper) puts the o columns into L_w
as well, so that every tensor the sharing ties has been pulled together first. With chains (A borrows
B, B borrows C) every borrowing unit is pulled towards its *root* (`plan.roots()`): that is the tensor
it will read once shared.

`constraint="prox"` (beyond the paper) takes the constraint out of the loss. Under Adam a penalty moves
every weight by about the learning rate per step whatever its size, so L_w closes a pair's distance
only as fast as lr x steps allows (two thirds of it in 800 steps at lr 5e-4 on SmolLM2). The prox pull
instead moves the tied tensors after each optimizer step by 1 / (steps left in the pull + 1): without the
LM loss the distance would fall linearly to exactly zero at step `pull_until` x steps and stay there,
and the LM loss trains the whole time against weights that are being merged. Each borrower is pulled
towards its root (which goes on learning freely) in every tensor the sharing ties (q, k, v rows with
their biases, o columns at the plan's scale), and a pruned unit's o columns shrink to zero the same
way, so plans that prune or scale (`fitshare`'s) post-train too. When training ends the model already is the shared model,
and sharing keeps the plan's scales. A plan's fitted weights (`fitshare` refits o columns) are not used
by postshare: it trains the original weights and lets the LM loss learn its own compensation;
share-then-tune applies them when it shares, before training.

`distill` (beyond the paper) replaces part of the LM loss by distillation from the model as it came:
(1 - distill) x LM loss + distill x KL(original || model) of the next-token distributions, per token, with a
frozen copy of the model made before any sharing as the teacher.

Training is a `transformers.Trainer` subclass, so `accelerate launch` runs the same code on one
process or many (DDP; DeepSpeed ZeRO-1/2 keep whole parameters on every rank and work too; FSDP or
ZeRO-3 shard parameters and would need them gathered for the constraint, which is not done here).

Two reference modes run through the same code:
- `share-then-tune`: share first, then fine-tune the shared model; a borrowed slice is a view of its
  root's parameter, so the tie holds by construction (one tensor, one gradient) and L_w is zero.
- `tune-only`: the same training with lambda 0 and no sharing: what training on this text alone does.

    >>> plan = headshare.make_plan(model, ratio=0.3)                             # doctest: +SKIP
    >>> cfg = PostTrainConfig(steps=200, out="smollm2-postshare")                # doctest: +SKIP
    >>> model = posttrain(model, tokenizer, plan, "builtin:calib", cfg)         # doctest: +SKIP

Output directory: the checkpoint (`headshare.load` reads a shared one), `posttrain.json` (config,
pairs, distances before and after, timings), `trainer_state.json` (the Trainer's log history with
`lm_loss` and `constraint_loss`) and `loss_curves.png`. Trainer checkpoints for `--resume` live in a
work directory beside it (`OUT.work` by default).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from .arch import Layout, blocks, layout_of
from .config import Config, check, is_integer, is_number
from .errors import HeadshareError
from .files import atomic_dir, check_output
from .plan import SharePlan
from .units import unit_views

MODES = ("postshare", "share-then-tune", "tune-only")
CONSTRAINTS = ("fro", "mse", "prox")  # prox: a pull after each step, not a loss term (beyond the paper)
DISTANCES = ("fro", "mse")
PARTS = ("qkv", "qkvo")  # what L_w pulls together: the paper's q/k/v, or the o columns too
CONFIG_VERSION = 1
RECORD_FILE = "posttrain.json"
PLOT_FILE = "loss_curves.png"


@dataclass
class PostTrainConfig(Config):
    """How to post-train. Defaults follow the paper (lambda 0.5, Frobenius L_w, lr 5e-5 cosine,
    weight decay 0.1, Adam betas (0.9, 0.95)); steps and block size are sized for a small model."""

    mode: str = "postshare"
    lam: float = 0.5  # weight of L_w; the LM loss gets 1 - lam
    constraint: str = "fro"
    parts: str = "qkv"  # "qkvo": the o columns in L_w too (beyond the paper)
    pull_until: float = 1.0  # prox: the fraction of the steps by which the pull has closed the pairs
    distill: float = 0.0  # weight of KL(original || model) per token; the LM loss gets 1 - distill (beyond the paper)
    lr: float = 5e-5
    steps: int = 200
    block_size: int = 512
    batch_size: int = 1  # per process
    seed: int = 0
    save_steps: int = 100
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    logging_steps: int = 1
    out: str | None = None  # final checkpoint; None: nothing is saved
    work_dir: str | None = None  # Trainer checkpoints; None: OUT.work, or a temporary directory
    resume: bool = False
    force: bool = False  # replace an existing output directory / start over in a used work dir
    keep_checkpoints: bool = False  # keep the work dir's Trainer checkpoints after a finished run
    bf16: bool | None = None  # None: bf16 mixed precision where CUDA supports it
    use_cpu: bool | None = None  # None: train on the GPU when there is one (headshare posttrain --device)
    progress: bool = True
    version: int = CONFIG_VERSION
    extra: dict = field(default_factory=dict)  # free-form notes recorded in posttrain.json

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas) if isinstance(self.adam_betas, list | tuple) else self.adam_betas
        check(self, "mode", self.mode in MODES, f"one of {', '.join(MODES)}")
        check(self, "constraint", self.constraint in CONSTRAINTS, f"one of {', '.join(CONSTRAINTS)}")
        check(self, "parts", self.parts in PARTS, f"one of {', '.join(PARTS)}")
        check(self, "lam", is_number(self.lam) and 0 <= self.lam <= 1, "a number in [0, 1]")
        check(self, "pull_until", is_number(self.pull_until) and 0 < self.pull_until <= 1, "a number in (0, 1]")
        check(self, "distill", is_number(self.distill) and 0 <= self.distill <= 1, "a number in [0, 1]")
        check(self, "lr", is_number(self.lr) and self.lr > 0, "a positive number")
        check(self, "weight_decay", is_number(self.weight_decay) and self.weight_decay >= 0, "a number >= 0")
        check(self, "adam_betas", isinstance(self.adam_betas, tuple) and len(self.adam_betas) == 2
              and all(is_number(b) and 0 <= b < 1 for b in self.adam_betas), "two numbers in [0, 1)")
        for name, low in (("steps", 1), ("block_size", 2), ("batch_size", 1), ("save_steps", 1),
                          ("logging_steps", 1), ("warmup_steps", 0), ("seed", 0)):
            v = getattr(self, name)
            check(self, name, is_integer(v) and v >= low, f"an integer >= {low}")
        for name in ("out", "work_dir"):
            check(self, name, getattr(self, name) is None or isinstance(getattr(self, name), str | Path),
                  "a path or none")
        for name in ("resume", "force", "keep_checkpoints", "progress"):
            check(self, name, isinstance(getattr(self, name), bool), "true or false")
        for name in ("bf16", "use_cpu"):
            check(self, name, getattr(self, name) is None or isinstance(getattr(self, name), bool),
                  "true, false or none")
        check(self, "extra", isinstance(self.extra, dict), "a mapping")
        check(self, "version", is_integer(self.version) and self.version <= CONFIG_VERSION,
              f"a config version this headshare reads (up to {CONFIG_VERSION})")

    @property
    def effective_lambda(self) -> float:
        """lambda as applied: tune-only trains without the constraint; under share-then-tune L_w is
        identically zero (the pairs read one tensor), so the LM loss gets the whole weight; the prox pull
        acts outside the loss."""
        return self.lam if self.mode == "postshare" and self.constraint != "prox" else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PostTrainConfig:
        """The config from `to_dict`'s mapping; an unknown key is refused, naming the known ones."""
        return super().from_dict(d)


# -- the constraint --------------------------------------------------------------------------------------

def constraint_pairs(plan: SharePlan) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(borrowing unit, root unit) for every assignment of the plan, sorted; chains go to their root."""
    return sorted(plan.roots().items())


def _unit_weights(block: nn.Module, layout: Layout, parts: str = "qkv") -> dict[str, torch.Tensor]:
    """{part: (units, width, in) or (units, out, width)} live views of the q/k/v (and o) weights of one block."""
    return {name: v for role, name, v in unit_views(block, layout) if role == "out" or "o" in parts}


def pair_distances(model: nn.Module, pairs, kind: str = "fro", parts: str = "qkv", unit: str = "kv") -> torch.Tensor:
    """Per-pair distance (n_pairs,) of units of the kind `unit`, summed over the q, k and v parts present in a
    unit (and the o columns with parts="qkvo").

    kind "fro": ||W - W'||_F per part; "mse": mean of (W - W')^2 per part. Gradients flow to the weights.
    """
    if kind not in DISTANCES:
        raise HeadshareError(f"distance must be one of {', '.join(DISTANCES)}, got {kind!r}")
    if parts not in PARTS:
        raise HeadshareError(f"parts must be one of {', '.join(PARTS)}, got {parts!r}")
    layout = layout_of(model.config, unit)
    layer_list = blocks(model)
    layers = sorted({u[0] for pair in pairs for u in pair})
    w = {lay: _unit_weights(layer_list[lay], layout, parts) for lay in layers}
    total = None
    for part in w[layers[0]] if layers else ():
        a = torch.stack([w[lay][part][u] for (lay, u), _ in pairs])  # (P, width, in)
        b = torch.stack([w[lay][part][u] for _, (lay, u) in pairs])
        diff = (a - b).float()
        # vector_norm has a zero (not NaN) gradient where a pair is already equal
        d = torch.linalg.vector_norm(diff, dim=(1, 2)) if kind == "fro" else diff.pow(2).mean((1, 2))
        total = d if total is None else total + d
    if total is None:
        return torch.zeros(0)
    return total


def constraint_loss(model: nn.Module, pairs, kind: str = "fro", parts: str = "qkv", unit: str = "kv") -> torch.Tensor:
    """L_w: the mean of `pair_distances` over the pairs (0 without pairs)."""
    d = pair_distances(model, pairs, kind, parts, unit)
    return d.mean() if d.numel() else d.sum()


class ProximalPull(TrainerCallback):
    """The prox constraint: after every optimizer step, move each borrowing unit's tied tensors towards
    what it will read once shared by `alpha` (see there), and pruned units' o columns towards zero.

    What a borrower will read is its root's q/k/v rows (and biases) and, for the o columns, its plan
    scale times the root's. Roots are not pulled: they go on learning from the LM loss alone, so a layer
    that lends is never disturbed for the sake of one that borrows. At alpha = 1 (from step `until` x steps
    on) every borrower holds exactly what sharing will give it. The rule depends on the step count only, so a
    resumed run pulls exactly as an uninterrupted one.
    """

    def __init__(self, plan: SharePlan, layout: Layout, until: float = 1.0):
        self.layout, self.until = layout, until
        scales = {(a.layer, a.unit): a.scale for a in plan.assignments}
        self.pairs = [(unit, root, scales[unit]) for unit, root in sorted(plan.roots().items())]
        self.pruned = sorted(tuple(p) for p in plan.pruned)

    def _slices(self, model: nn.Module, layer: int) -> list[tuple[str, torch.Tensor]]:
        """(role, (units, ...) view) of every tensor with unit slices in one block (weights and biases)."""
        return [(role, v) for role, _, v in unit_views(blocks(model)[layer], self.layout, biases=True)]

    @torch.no_grad()
    def pull(self, model: nn.Module, alpha: float) -> None:
        cache: dict[int, list] = {}

        def sl(layer: int) -> list:
            if layer not in cache:
                cache[layer] = self._slices(model, layer)
            return cache[layer]

        for (lay, u), (rl, ru), scale in self.pairs:
            for (role, mine), (_, root) in zip(sl(lay), sl(rl), strict=True):
                target = root[ru] * scale if role == "in" else root[ru]  # o columns carry the scale
                if alpha < 1:
                    mine[u].lerp_(target, alpha)
                else:
                    mine[u].copy_(target)
        for lay, u in self.pruned:
            for role, v in sl(lay):
                if role == "in":
                    v[u].mul_(1 - alpha)

    def alpha(self, step: int, steps: int) -> float:
        """The pull after optimizer step `step` (1-based) of `steps`: the distance falls linearly to zero
        at step round(until * steps), and later steps hold it there."""
        left = max(1, round(self.until * steps)) - step
        return 1.0 / (left + 1) if left >= 0 else 1.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.pull(model, self.alpha(state.global_step, state.max_steps))  # global_step counts this step


# -- training --------------------------------------------------------------------------------------------

class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class PostShareTrainer(Trainer):
    """Trainer whose loss is (1 - lam) * L + lam * L_w with L = (1 - distill) * LM loss + distill * KL;
    logs `lm_loss`, `constraint_loss` and, with a teacher, `kl`.

    `pairs` empty (share-then-tune) means L alone. The constraint is measured (without gradient) even at
    lam 0, so tune-only logs how far the pairs drift without it. `teacher` (a frozen copy of the model
    before any sharing) gives KL(teacher || model) of the next-token distributions, a mean per token.
    """

    def __init__(self, *args, pairs=(), lam: float = 0.5, constraint: str = "fro", parts: str = "qkv",
                 unit: str = "kv", teacher: nn.Module | None = None, distill: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pairs, self.lam, self.constraint, self.parts = list(pairs), lam, constraint, parts
        self.unit = unit  # the kind of the units the pairs name
        self.teacher, self.distill = teacher, distill
        # our loss is a per-batch mean, so the Trainer must divide it by the accumulation steps itself
        self.loss_is_scaled_for_ga = False
        self._sums = torch.zeros(3, dtype=torch.float64)
        self._count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # every block is full length, so the per-batch mean is also the mean over all processes' tokens
        outputs = model(**inputs)
        lm = outputs.loss
        loss = lm
        cw = kl = None
        if self.teacher is not None:
            ids = inputs["input_ids"]
            if next(self.teacher.parameters()).device != ids.device:  # the Trainer moved the model, not the teacher
                self.teacher.to(ids.device)
            with torch.no_grad():
                ref = self.teacher(input_ids=ids).logits
            kl = distill_loss(outputs.logits, ref)
            loss = (1 - self.distill) * lm + self.distill * kl
        if self.pairs:
            # the live parameters, not DDP's wrapper: autograd sums both terms before DDP's reducer hook
            raw = self.accelerator.unwrap_model(model)
            if self.lam > 0:
                cw = constraint_loss(raw, self.pairs, self.constraint, self.parts, self.unit)
                loss = (1 - self.lam) * loss + self.lam * cw
            else:
                with torch.no_grad():
                    kind = self.constraint if self.constraint in DISTANCES else "fro"
                    cw = constraint_loss(raw, self.pairs, kind, self.parts, self.unit)
        if model.training:
            self._sums[0] += lm.detach().double().cpu()
            self._sums[1] += (cw.detach().double().cpu() if cw is not None else 0.0)
            self._sums[2] += (kl.detach().double().cpu() if kl is not None else 0.0)
            self._count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._count:
            mean = (self._sums / self._count).to(self.args.device)
            mean = self.accelerator.reduce(mean, reduction="mean")  # every rank logs here together
            logs["lm_loss"] = round(float(mean[0]), 6)
            if self.pairs:
                logs["constraint_loss"] = round(float(mean[1]), 6)
            if self.teacher is not None:
                logs["kl"] = round(float(mean[2]), 6)
            self._sums.zero_()
            self._count = 0
        super().log(logs, start_time)


def distill_loss(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean per position of KL(ref || model) between the next-token distributions, in float32."""
    logp = torch.log_softmax(logits.float(), -1)
    logq = torch.log_softmax(ref.float(), -1)
    return (logq.exp() * (logq - logp)).sum(-1).mean()


def training_blocks(tokenizer, data, block_size: int) -> torch.Tensor:
    """`data` (a text source read with split="calib", "builtin:calib" when None, or ready blocks) as
    (n, block_size) token blocks; refuses the built-in evaluation text."""
    from .data import load_text, token_blocks

    if data is None:
        data = "builtin:calib"
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[1] != block_size:
            raise HeadshareError(f"data blocks must be (n, block_size={block_size}), got {tuple(data.shape)}")
        return data.long()
    if data.replace(" ", "") == "builtin:eval":
        raise HeadshareError("refusing to train on builtin:eval, the held-out half used for evaluation; "
                         "use builtin:calib (the default)")
    text = load_text(data, split="calib")
    out = token_blocks(tokenizer, text, block_size)
    if out.shape[0] == 0:
        raise HeadshareError(f"{data!r} holds fewer tokens than one block of {block_size}")
    return out


def _checkpoints(work: Path) -> list[Path]:
    found = [p for p in work.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _training_args(cfg: PostTrainConfig, output_dir: Path) -> TrainingArguments:
    cuda = torch.cuda.is_available() and not cfg.use_cpu
    bf16 = cfg.bf16 if cfg.bf16 is not None else (cuda and torch.cuda.is_bf16_supported())
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_betas[0],
        adam_beta2=cfg.adam_betas[1],
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        report_to="none",
        use_cpu=not cuda,
        bf16=bool(bf16),
        dataloader_drop_last=True,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every parameter is in the graph (the LM loss reaches all)
        disable_tqdm=not cfg.progress,
    )


def posttrain(model: nn.Module, tokenizer, plan: SharePlan | None, data, config: PostTrainConfig | None = None,
              callbacks: list[TrainerCallback] | None = None) -> nn.Module:
    """Post-train `model` as `config.mode` says, share it (unless tune-only), save to `config.out`.

    Args:
        plan: the pairs to pull together and share (needed by postshare and share-then-tune; recorded
            for reference by tune-only).
        data: a text source for `headshare.data.load_text` (read with split="calib"; e.g.
            "builtin:calib", the default when None, a .txt file, a saved or hub dataset), or a
            (n, block_size) LongTensor of token blocks.
        callbacks: extra Trainer callbacks.

    Returns the trained model: shared in place for postshare and share-then-tune.

    >>> model = posttrain(model, tok, headshare.make_plan(model, 0.3), "builtin:calib",
    ...                   PostTrainConfig(steps=200, out="out"))   # doctest: +SKIP
    """
    cfg = config or PostTrainConfig()
    if plan is None and cfg.mode != "tune-only":
        raise HeadshareError(f"mode {cfg.mode!r} needs a plan (pairs to share)")
    if plan is not None:
        plan.validate(layout_of(model.config, plan.unit_kind))
        if plan.bases and cfg.mode == "postshare":
            # the weight-similarity pull acts on pairs of units; a basis is fitted, not pulled towards
            raise HeadshareError(f"a {plan.method!r} plan puts layers on shared bases, which postshare's pull cannot "
                             "make; post-train it with mode 'share-then-tune' (--mode share-then-tune)")
    out = Path(cfg.out).resolve() if cfg.out else None
    if out is not None:
        check_output(out, force=cfg.force)
    if cfg.resume and cfg.work_dir is None and out is None:
        raise HeadshareError("resume needs the work_dir (or out) of the interrupted run")
    blocks_ = training_blocks(tokenizer, data, cfg.block_size)  # before any directory is made
    if cfg.work_dir is not None or out is not None:
        return _run(model, tokenizer, plan, blocks_, cfg, out, Path(cfg.work_dir or f"{out}.work").resolve(),
                    callbacks)
    work = Path(tempfile.mkdtemp(prefix="headshare-posttrain-"))  # one per rank; nothing to resume from
    try:
        return _run(model, tokenizer, plan, blocks_, cfg, None, work, callbacks)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(model, tokenizer, plan, blocks_: torch.Tensor, cfg: PostTrainConfig, out: Path | None, work: Path,
         callbacks) -> nn.Module:
    from accelerate import PartialState

    from .sharing import share

    layout = layout_of(model.config, plan.unit_kind if plan is not None else None)  # the plan's units
    args = _training_args(cfg, work / "trainer")
    args.device  # noqa: B018 -- sets up the process group under `accelerate launch` (gloo on CPU)
    state = PartialState()
    if blocks_.shape[0] < cfg.batch_size * state.num_processes:
        raise HeadshareError(f"{blocks_.shape[0]} blocks of {cfg.block_size} tokens cannot fill one batch of "
                         f"{cfg.batch_size} x {state.num_processes} processes; give more text or smaller blocks")
    found = _checkpoints(work / "trainer")
    if found and not cfg.resume and not cfg.force:
        raise FileExistsError(f"{work} holds checkpoints of an earlier run ({found[-1].name}); pass resume=True "
                              "(--resume) to continue it or force=True (--force) to start over")
    if cfg.resume and not found:
        raise FileNotFoundError(f"--resume: no checkpoint-* in {work / 'trainer'}")
    state.wait_for_everyone()  # every rank has looked before rank 0 clears anything
    if found and not cfg.resume and state.is_main_process:
        for p in found:
            shutil.rmtree(p)
    state.wait_for_everyone()

    set_seed(cfg.seed)
    pairs = constraint_pairs(plan) if plan is not None else []
    with torch.no_grad():
        before = pair_distances(model, pairs, parts=cfg.parts, unit=layout.unit_kind).tolist() if pairs else []
    teacher = None
    if cfg.distill > 0:
        # the model as it came, frozen: what the shared model is trained to predict like (one more copy in memory)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.mode == "share-then-tune":
        share(model, plan)

    callbacks = list(callbacks or [])
    if cfg.mode == "postshare" and cfg.constraint == "prox":
        callbacks.append(ProximalPull(plan, layout, cfg.pull_until))
    trainer = PostShareTrainer(
        model=model, args=args, train_dataset=BlockDataset(blocks_), callbacks=callbacks,
        pairs=pairs if cfg.mode != "share-then-tune" else (), lam=cfg.effective_lambda, constraint=cfg.constraint,
        parts=cfg.parts, unit=layout.unit_kind, teacher=teacher, distill=cfg.distill,
    )
    t0 = time.time()
    trainer.train(resume_from_checkpoint=str(found[-1]) if cfg.resume else None)
    seconds = time.time() - t0
    model = trainer.model
    model.eval()
    with torch.no_grad():
        after = pair_distances(model, pairs, parts=cfg.parts, unit=layout.unit_kind).tolist() \
            if pairs and cfg.mode != "share-then-tune" else []
    if cfg.mode == "postshare":
        # the trained weights supersede any weights a method fitted with the plan; a penalty has pulled
        # the pairs to equal, so they share as the paper does, at scale 1; the prox pull has already made
        # each borrower's o columns its scale times its root's, so the scales stay
        assignments = (plan.assignments if cfg.constraint == "prox"
                       else [replace(a, scale=1.0) for a in plan.assignments])
        share(model, replace(plan, assignments=assignments, fitted={}, fitted_names=[], base_sha1=None))

    if out is not None and state.is_main_process:
        logged = [r for r in trainer.state.log_history if "lm_loss" in r]
        record = {
            "mode": cfg.mode, "config": cfg.to_dict(), "effective_lambda": cfg.effective_lambda,
            "shared": cfg.mode != "tune-only", "layout": layout.to_dict(),
            "pairs": [{"layer": a[0], "unit": a[1], "root_layer": r[0], "root_unit": r[1]} for a, r in pairs],
            "pair_distance_fro_before": before, "pair_distance_fro_after": after,
            "mean_pair_distance_fro_before": sum(before) / len(before) if before else None,
            "mean_pair_distance_fro_after": sum(after) / len(after) if after else None,
            "plan": plan.to_dict() if plan is not None else None,
            "train_blocks": int(blocks_.shape[0]), "block_size": cfg.block_size,
            "processes": state.num_processes, "global_batch": cfg.batch_size * state.num_processes,
            "final_lm_loss": logged[-1]["lm_loss"] if logged else None,
            "final_constraint_loss": logged[-1].get("constraint_loss") if logged else None,
            "steps": trainer.state.global_step, "train_seconds": round(seconds, 2),
            "device": str(args.device), "bf16": args.bf16,
        }
        _save(model, tokenizer, out, cfg, trainer, record)
    state.wait_for_everyone()
    if out is not None and state.is_main_process and not cfg.keep_checkpoints:
        # the run is complete: its checkpoints (3x the model with the optimizer) are of no more use
        if cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for p in _checkpoints(work / "trainer"):
                shutil.rmtree(p)
    return model


def _save(model, tokenizer, out: Path, cfg: PostTrainConfig, trainer: Trainer, record: dict) -> None:
    """The checkpoint, the record, the log history and the plot, written together and renamed into place."""
    with atomic_dir(out, force=cfg.force) as tmp:
        if cfg.mode == "tune-only":
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, force=True, tokenizer=tokenizer)  # tmp is ours and empty
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        plot_losses(trainer.state.log_history, tmp / PLOT_FILE, title=cfg.mode)


def plot_losses(log_history: list[dict], path: str | Path, title: str = "") -> None:
    """LM loss and constraint loss against the step, side by side (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in log_history if "lm_loss" in r]
    has_c = any("constraint_loss" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_c else 1, figsize=(9 if has_c else 5, 3.2), squeeze=False)
    axes[0][0].plot([r["step"] for r in rows], [r["lm_loss"] for r in rows], lw=1)
    axes[0][0].set(xlabel="step", ylabel="LM loss", title=f"{title}: LM loss".strip(": "))
    if has_c:
        c = [r for r in rows if "constraint_loss" in r]
        axes[0][1].plot([r["step"] for r in c], [r["constraint_loss"] for r in c], lw=1, color="C1")
        axes[0][1].set(xlabel="step", ylabel="L_w", title=f"{title}: constraint (L_w)".strip(": "))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
