"""Run configs of `sheared prune` and `sheared train` (typed, strict; see `sheared.config`)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sheared.config import config_from_dict
from sheared.data.prepare import AutoPrepare
from sheared.errors import UserError
from sheared.model.random_source import SourceInit
from sheared.pruning.search import DEFAULT_WIDTH_MULTIPLE
from sheared.pruning.target import BUDGET_KINDS, SHAPE_KEYS, TargetBudget, TargetShape


@dataclass
class DataConfig:
    """Training data and dynamic batch loading."""

    path: str
    """Prepared data directory (`sheared data prepare`)."""
    seq_len: int | None = None
    """Sequence length the prepared data must have (checked; also used by `--dry-run` before the data exists)."""
    initial_weights: dict[str, float] | None = None
    """Initial domain weights (domain -> weight, summing to 1); None: proportional to training tokens
    when pruning, and the pruning run's final weights when continuing a pruned model."""
    reference_losses: str | dict[str, float] = "source"
    """`source` (the source model's own per-domain eval loss), a mapping domain -> loss, or a JSON
    file written by `sheared data reference-loss`."""
    dynamic: bool = True
    """Reweight the domains every `train.eval_interval` steps (dynamic batch loading)."""
    eta: float = 1.0
    """Step size of the weight update."""
    smoothing: float = 1e-4
    """Share of the uniform distribution mixed into every update."""
    clip_excess: bool = True
    """Clip negative excess losses to 0 (the paper's Algorithm 1; false reproduces the released code)."""
    eval_batch_size: int = 8
    """Sequences per forward pass during evaluation."""
    max_eval_sequences: int | None = None
    """Evaluate at most this many held-out sequences per domain (None: all)."""
    verify: Literal["checksum", "size"] = "checksum"
    """How token files are checked against their metadata before training."""
    auto_prepare: AutoPrepare | None = None
    """If set and `path` holds no prepared data, make it first (corpus + prepare)."""

    def __post_init__(self) -> None:
        if self.eta <= 0:
            raise UserError(f"data.eta must be positive, got {self.eta}")
        if not 0 <= self.smoothing < 1:
            raise UserError(f"data.smoothing must be in [0, 1), got {self.smoothing}")
        if self.eval_batch_size < 1:
            raise UserError(f"data.eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.max_eval_sequences is not None and self.max_eval_sequences < 1:
            raise UserError(
                f"data.max_eval_sequences must be at least 1 (or null for all), got {self.max_eval_sequences}"
            )


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (one multiplier for every parameter group)."""

    lr: float = 1e-4
    """Peak learning rate of the model weights."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the model weights."""
    warmup_fraction: float = 0.1
    """Linear warm-up over this fraction of the steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak."""
    grad_clip: float = 1.0
    """Clip the gradient norm of the model weights to this (0: no clipping)."""
    clip_masks_with_model: bool = False
    """Clip the model's, log_alpha's and the lambdas' gradients with one global norm, as the reference
    implementation did (only to reproduce it: the lambdas' gradients then shrink the model's)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"optim.lr must be a positive number, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_fraction <= 1:
            raise UserError(f"optim.warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise UserError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")


@dataclass
class PruningConfig:
    """The target shape, how masks are found (learned or one-shot), and the mask/multiplier optimisation."""

    target: TargetShape | TargetBudget | dict[str, Any]
    """Exact shape of the pruned model (the five numbers), or a budget the run turns into the best
    valid shape: `{params: 60M}` (total parameters), `{params_fraction: 0.5}` (of the source's
    non-embedding parameters) or `{memory_mb: 100, dtype: bfloat16}` (docs/method.md, "Budget
    targets"). Any other mapping is refused in one line."""
    method: Literal["l0", "activation", "magnitude", "random"] = "l0"
    """`l0`: learned hard-concrete masks trained with the model (Sheared LLaMA); one-shot, no training
    steps: `activation` (Minitron head/channel/hidden importance, ShortGPT block influence for layers),
    `magnitude` (weight norms, no data), `random` (seeded; the sanity floor)."""
    init: Literal["uniform", "activation", "magnitude", "oneshot"] = "uniform"
    """`l0` only: `uniform` starts every log_alpha at 5 (the paper); a scoring method orders each row's
    initial log_alpha by that method's ranking (docs/method.md), everything still kept at step 0;
    `oneshot` starts from the activation one-shot choice itself: kept structures well inside, dropped
    ones at the decision boundary, so that the learned masks refine that choice."""
    calibration: int = 8
    """Calibration sequences per domain (from the prepared training split) for activation scores."""
    width_scores: Literal["full", "after_depth"] = "full"
    """Activation scores of heads, channels and hidden dims measured on the full model, or after
    dropping the layers block influence drops (a second calibration pass)."""
    scores: str | None = None
    """`scores.pt` of an earlier run on the same source (another target is fine) to use instead of
    calibrating again."""
    log_alpha_lr: float = 1.0
    """Learning rate of the masks' log_alpha."""
    lambda_lr: float = 1.0
    """Learning rate of the Lagrange multipliers (gradient ascent)."""
    lagrangian_warmup_fraction: float = 0.2
    """The target sparsity rises linearly from 0 over this fraction of the steps (both controllers)."""
    controller: Literal["lagrangian", "projection"] = "projection"
    """How the masks are held to the target: `lagrangian` (the paper: λ1·gap + λ2·gap² with the
    multipliers trained by gradient ascent; lands exactly only on long runs) or `projection`
    (after every step each mask row's log_alpha is shifted by one scalar so that its expected
    sparsity equals the warmed-up target exactly: docs/method.md, "Landing on the target")."""
    harden_fraction: float = 0.1
    """The last this fraction of the pruning steps trains the model under the exact-target
    deterministic masks (top-k log_alpha per row, binary; log_alpha frozen), so that the exported
    model is the model the run trained. 0: masks are sampled to the end (the paper)."""
    search: Literal["loss", "rule"] = "loss"
    """Budget targets: `loss` measures the calibration loss of the first `search_candidates`
    rule-ranked shapes under their one-shot masks and uses the lowest (Minitron's search); `rule`
    uses the first rule-ranked shape (no calibration)."""
    search_candidates: int = 8
    """Budget targets: how many rule-ranked shapes the `loss` search measures."""
    width_multiple: int = DEFAULT_WIDTH_MULTIPLE
    """Budget targets: hidden and intermediate widths are multiples of this (or the source's own)."""

    def __post_init__(self) -> None:
        if isinstance(self.target, Mapping):
            self.target = _parse_target(self.target)
        if self.search_candidates < 1:
            raise UserError(f"pruning.search_candidates must be at least 1, got {self.search_candidates}")
        if self.width_multiple < 1:
            raise UserError(f"pruning.width_multiple must be at least 1, got {self.width_multiple}")
        if self.log_alpha_lr <= 0 or self.lambda_lr <= 0:
            raise UserError("pruning.log_alpha_lr and pruning.lambda_lr must be positive")
        if not 0 <= self.lagrangian_warmup_fraction <= 1:
            raise UserError(
                f"pruning.lagrangian_warmup_fraction must be in [0, 1], got {self.lagrangian_warmup_fraction}"
            )
        if not 0 <= self.harden_fraction < 1:
            raise UserError(f"pruning.harden_fraction must be in [0, 1), got {self.harden_fraction}")
        if self.calibration < 1:
            raise UserError(
                f"pruning.calibration must be at least 1 sequence per domain, got {self.calibration}"
            )
        if self.method != "l0" and self.init != "uniform":
            raise UserError(
                f"pruning.init ({self.init}) applies to method l0 only; method {self.method} is itself one-shot"
            )

    @property
    def one_shot(self) -> bool:
        """Masks from one-shot scores, no training steps."""
        return self.method != "l0"

    @property
    def budget(self) -> TargetBudget | None:
        """The budget the target is given as, or None for an exact shape."""
        return self.target if isinstance(self.target, TargetBudget) else None

    @property
    def scoring(self) -> str | None:
        """The scoring method this run needs (one-shot method or l0 init), or None."""
        if self.one_shot:
            return self.method
        if self.init == "oneshot":
            return "activation"
        return None if self.init == "uniform" else self.init


def _parse_target(value: Mapping[str, Any]) -> TargetShape | TargetBudget:
    """`pruning.target` from a mapping that neither a shape nor a budget accepted: the one-line reason.

    (The config loader tries TargetShape, then TargetBudget, and hands over the raw mapping when
    both refuse it, so that the message here can say which kind was meant.)
    """
    keys = [str(k) for k in value]
    valid = [*SHAPE_KEYS, *BUDGET_KINDS, "dtype"]
    unknown = [k for k in keys if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"unknown key pruning.target.{unknown[0]}; {hint}give the five shape numbers "
            f"({', '.join(SHAPE_KEYS)}) or one budget (params, params_fraction, or memory_mb with dtype)"
        )
    shape = [k for k in keys if k in SHAPE_KEYS]
    budget = [k for k in keys if k not in SHAPE_KEYS]
    if shape and budget:
        raise UserError(
            f"pruning.target mixes shape numbers ({', '.join(shape)}) with a budget ({', '.join(budget)}); "
            "give the five shape numbers or one budget, not both (a budget replaces the whole target mapping "
            "in the config file)"
        )
    cls = TargetShape if shape else TargetBudget
    return config_from_dict(cls, value, "pruning.target")


@dataclass
class DistillConfig:
    """Logit distillation from a frozen teacher: loss = (1 - alpha)·CE + alpha·τ²·KL(teacher ‖ student)."""

    teacher: str = "none"
    """`none`; `source` (pruning: the source being pruned; continued pretraining: the source the
    pruned model came from, as its export records); or any source spec (HF dir, .gguf, embedded name)
    with the student's tokenizer."""
    alpha: float = 0.5
    """Weight of the distillation term (0: plain next-token loss)."""
    temperature: float = 1.0
    """Softmax temperature τ of both distributions; the KL term is scaled by τ²."""
    top_k: int | None = None
    """Distil over the teacher's top-k tokens only (its probabilities renormalised over them; the rest
    of its mass is dropped); None: the whole vocabulary."""

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise UserError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"distill.temperature must be a positive number, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"distill.top_k must be at least 1 (or null), got {self.top_k}")

    @property
    def enabled(self) -> bool:
        return self.teacher != "none"

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse a `top_k` larger than the model's vocabulary (when distilling)."""
        if self.enabled and self.top_k is not None and self.top_k > vocab_size:
            raise UserError(
                f"distill.top_k is {self.top_k} but the vocabulary has {vocab_size} tokens; choose at most "
                f"{vocab_size}, or null for the whole vocabulary"
            )


@dataclass
class LoopConfig:
    """Steps, batches, evaluation, checkpoints, precision."""

    steps: int
    """Optimizer steps."""
    global_batch_size: int
    """Sequences per optimizer step, over all ranks."""
    micro_batch_size: int
    """Sequences per forward pass on one rank (the rest is gradient accumulation)."""
    eval_interval: int = 50
    """Evaluate per domain (and update the domain weights) every this many steps."""
    save_interval: int = 200
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    seed: int = 0
    """Seed of data order, mask noise and random initialisation."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`bf16`: matrix products in bfloat16 under autocast (FSDP2: parameters gathered in bfloat16)
    while the weights, their optimizer state, masks, log_alpha and lambdas stay float32; `fp32`;
    `auto`: bf16 on CUDA devices with bf16 and on CPUs with native bf16 (AVX-512 bf16 / AMX), fp32
    elsewhere (emulated bf16 is tens of times slower)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    compile: bool = False
    """`torch.compile` every decoder layer (masks stay tensor inputs, so one graph serves every step);
    measured on CPU in docs/benchmarks.md (off by default: see there)."""
    dead_steps: int = 20
    """Warn when the loss sits at ln(vocabulary) with a zero gradient for this many steps, or for 20% of
    the run when that is shorter (at least 2); a run that ends so exits with code 2 (0: never)."""
    loss_chunk_tokens: int | None = None
    """Tokens per chunk of the fused loss: the output projection, softmax and their gradient run on
    this many tokens at a time, so no (tokens, vocabulary) tensor of the whole batch is ever held;
    None: as many as fill a 256 MiB float32 buffer (523 tokens at Llama 3's 128,256 vocabulary)."""

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "global_batch_size",
            "micro_batch_size",
            "eval_interval",
            "save_interval",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise UserError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        if self.dead_steps < 0:
            raise UserError(f"train.dead_steps must be >= 0 (0: no warning), got {self.dead_steps}")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise UserError(
                f"train.loss_chunk_tokens must be at least 1 (or null), got {self.loss_chunk_tokens}"
            )

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per rank and step for `world_size` data-parallel ranks."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise UserError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size}) × ranks ({world_size})"
            )
        return self.global_batch_size // per_step

    def is_eval_step(self, step: int) -> bool:
        """Whether evaluation (and the domain reweighting) follows the 1-based `step`."""
        return step % self.eval_interval == 0 or step == self.steps

    def is_save_step(self, step: int) -> bool:
        """Whether a checkpoint is written after the 1-based `step`."""
        return step % self.save_interval == 0 or step == self.steps


@dataclass
class DistributedConfig:
    """Data parallelism under torchrun."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """`auto`: DDP when started by torchrun with several processes, else none."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (saves activation memory)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend (`auto`: nccl on CUDA, gloo on CPU)."""


@dataclass
class PruneConfig:
    """`sheared prune`: learn masks to the target shape while training the source."""

    source: str
    """Source model: a Hugging Face directory, a .gguf file or `smollm2-135m`."""
    data: DataConfig
    """Training data and dynamic batch loading."""
    pruning: PruningConfig
    """Target shape and mask/multiplier optimisation."""
    train: LoopConfig
    """Steps, batches, evaluation and checkpoint intervals."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and schedule of the model weights."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Data parallelism."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation from a frozen teacher (off by default)."""
    source_init: SourceInit | None = None
    """Write a random-weight source to `source` if that directory does not exist."""
    source_config: str | None = None
    """A copy of the source's config.json, used by `--dry-run` when `source` is not on this machine."""

    @property
    def source_spec(self) -> str:
        """The model the run starts from (the source being pruned)."""
        return self.source

    @property
    def shape_config(self) -> str | None:
        """A config.json that describes the source when it is not on this machine."""
        return self.source_config


@dataclass
class TrainConfig:
    """`sheared train`: continued pretraining of an exported (or any Hugging Face) model."""

    model: str
    """Model to train: an export of `sheared export`, any Hugging Face directory, or a .gguf file."""
    data: DataConfig
    """Training data and dynamic batch loading."""
    train: LoopConfig
    """Steps, batches, evaluation and checkpoint intervals."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_fraction=0.03))
    """AdamW and schedule (continued pretraining warms up over 3% of the steps)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Data parallelism."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation from a frozen teacher (off by default)."""
    model_config: str | None = None
    """A copy of the model's config.json, used by `--dry-run` when `model` does not exist yet."""

    @property
    def source_spec(self) -> str:
        """The model the run starts from (the model being trained)."""
        return self.model

    @property
    def shape_config(self) -> str | None:
        """A config.json that describes the model when it does not exist yet."""
        return self.model_config
