"""The training loop shared by `sheared prune` (with masks) and `sheared train` (without).

Reads top to bottom:

1. `set_up`: process group and device, run directory, source model, prepared data, masks; domain
   weights, reference losses and the sampler; optimizer; resume from the newest checkpoint;
2. `train_step`: the global batch from the sampler, this rank's micro-batches, one mask sample per
   micro-batch (seeded by step and global micro-batch index, never by rank), backward; the
   Lagrangian once per step; gradient clipping on the model weights; one AdamW step;
3. `evaluate_and_reweight`, every `eval_interval` steps: per-domain eval loss (under deterministic
   masks at the expected size while pruning), then the dynamic-batch-loading update;
4. `save`: checkpoints (atomic, exact resume) and, at the end, the final masks.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sheared import run_dir as rf
from sheared.config import save_config
from sheared.data.dbl import (
    read_reference_losses,
    update_domain_weights,
)
from sheared.data.sampler import DomainMixtureSampler, rank_slice
from sheared.data.tokens import PreparedData
from sheared.errors import UserError
from sheared.eval.domain_loss import DomainMetrics
from sheared.eval.loss import LossParts, fused_loss, next_token_labels
from sheared.model import CausalLM, Masks, parameter_counts
from sheared.pruning import L0Module, LagrangianConstraint
from sheared.pruning.compaction import kept_structure
from sheared.pruning.controller import TargetController
from sheared.train import checkpoint as ckpt
from sheared.train.calibration import save_scores
from sheared.train.checkpoint import Trainable
from sheared.train.config import PruneConfig, TrainConfig
from sheared.train.deadline import Deadline, StepTimes
from sheared.train.distributed import (
    DistEnv,
    all_reduce_sum,
    assert_same_on_all_ranks,
    average_gradients,
    barrier,
    gradient_sync,
    shutdown,
    wrap_model,
)
from sheared.train.metrics import MetricsWriter
from sheared.train.oneshot import run_oneshot
from sheared.train.optim import build_optimizer, lr_multiplier, set_learning_rates
from sheared.train.setup import (
    Resolved,
    RunResult,
    evaluate,
    initial_sampler,
    load_run_inputs,
    open_run_dir,
    resolve_run,
    run_scores,
)
from sheared.train.teacher import load_teacher
from sheared.train.teacher import output_weight as teacher_output_weight


@dataclass
class RunState:
    """What the step functions share: built by `set_up`, advanced by `train_step`."""

    cfg: PruneConfig | TrainConfig
    env: DistEnv
    files: rf.RunDir
    model: CausalLM
    """The bare decoder (its parameters are the ones clipped and optimised)."""
    trainable: Trainable
    """The wrapped decoder (DDP / FSDP2), the L0 module and the multipliers, as checkpointed."""
    optimizer: torch.optim.Optimizer
    data: PreparedData
    sampler: DomainMixtureSampler
    resolved: Resolved
    """Device, precision, exact target and stream start, decided once by `set_up`."""
    accumulation_steps: int
    teacher: nn.Module | None = None
    """The frozen distillation teacher (not checkpointed), or None."""
    controller: TargetController | None = None
    """What holds the masks to the target (pruning runs)."""
    dead_run: DeadRunGuard | None = None
    reference: dict[str, float] = field(default_factory=dict)
    step: int = 0
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False
    last_step: int = 0
    """The step the run ends at: `train.steps`, or earlier when a deadline shortened it."""
    deadline: Deadline | None = None
    times: StepTimes = field(default_factory=StepTimes)

    def is_eval_step(self, step: int) -> bool:
        return self.cfg.train.is_eval_step(step) or step == self.last_step

    def is_save_step(self, step: int) -> bool:
        return self.cfg.train.is_save_step(step) or step == self.last_step

    @property
    def l0(self) -> L0Module | None:
        return self.trainable.l0

    @property
    def lagrangian(self) -> LagrangianConstraint | None:
        return self.trainable.lagrangian

    @property
    def domains(self) -> list[str]:
        return self.data.domains

    @property
    def last_eval(self) -> dict[str, float]:
        return self.history[-1]["eval_loss"] if self.history else {}

    def evaluate(self, masks: Masks | None, split: str = "eval") -> DomainMetrics:
        """Per-domain loss of the (wrapped) model on `split` (and, on the held-out split, KL to the
        teacher), summed over ranks."""
        teacher = self.teacher if split == "eval" else None
        return evaluate(
            self.trainable.model, self.data, self.cfg, self.resolved, masks, split=split, teacher=teacher
        )


def mask_generator(seed: int, step: int, micro_batch: int) -> torch.Generator:
    """The generator of one micro-batch's mask sample: seeded by (seed, step, global micro-batch)."""
    state = np.random.SeedSequence([seed, step, micro_batch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def run(
    cfg: PruneConfig | TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
    deadline: Deadline | None = None,
) -> RunResult:
    """Run `sheared prune` (a `PruneConfig`) or `sheared train` (a `TrainConfig`) into `run_dir`.

    `resume`: continue the run there from its newest intact checkpoint (a finished run is left as it
    is); `restart`: move the run there aside to `RUN.replaced-N/` and start again (`open_run_dir`).
    `deadline` (continued pretraining only): end by then, shortening the run if its speed says it
    must (`sheared.train.deadline`).
    """
    if deadline is not None and isinstance(cfg, PruneConfig):
        raise ValueError("a deadline shortens continued-pretraining runs only (pruning schedules its masks)")
    resolved = resolve_run(cfg)
    env, files = resolved.env, rf.RunDir(run_dir)
    try:
        opening = open_run_dir(cfg, files, env, resume=resume, restart=restart)
        if opening.finished is not None:
            return opening.finished
        if env.is_main and progress:
            print(f"precision: {resolved.precision.describe()}", flush=True)
        if isinstance(cfg, PruneConfig) and cfg.pruning.one_shot:
            return run_oneshot(cfg, files, resolved, resume, progress and env.is_main)
        state = set_up(cfg, files, resolved, opening.checkpoint)
        state.deadline = deadline
        if env.is_main and progress:
            print(f"data stream: {state.resolved.stream_start}", flush=True)
        return _train(state, progress and env.is_main)
    finally:
        shutdown(env)


def _train(state: RunState, progress: bool) -> RunResult:
    """Steps from where `state` is to the end, with evaluation, logging and checkpoints."""
    loop, pruning = state.cfg.train, state.l0 is not None
    metrics = MetricsWriter(
        state.files.path, enabled=state.env.is_main, resume_step=state.step if state.resumed else None
    )
    for before in metrics.kept if state.dead_run is not None else []:  # a resumed run: how long dead
        state.dead_run.observe(
            before["step"], _watched_loss(state, before), float(before["grad_norm"]), quiet=True
        )
    bar = tqdm(
        total=state.last_step, initial=state.step, disable=not progress, desc="prune" if pruning else "train"
    )
    record: dict[str, Any] = {}
    try:
        step = state.step
        while step < state.last_step:
            t0 = time.perf_counter()
            record = train_step(state, step)
            state.times.steps.append(time.perf_counter() - t0)
            if state.is_eval_step(step + 1):
                t0 = time.perf_counter()
                record.update(evaluate_and_reweight(state))
                state.times.evaluation = time.perf_counter() - t0
            _keep_deadline(state, step + 1, record, bar)
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(_progress_line(state, record))
            if state.is_save_step(step + 1):
                t0 = time.perf_counter()
                save(state)
                state.times.checkpoint = time.perf_counter() - t0
            step += 1
    finally:  # an error (divergence, a full disk) prints on its own line, after the bar
        bar.close()
        metrics.close()
    # every rank decides together whether the run ended dead (after a resume only rank 0 replayed how
    # long it was dead); before the last barrier, so that no collective on a Python-owned tensor is
    # still being retired by gloo's worker threads when the process group is torn down (a GIL deadlock)
    ended_dead = state.dead_run is not None and state.dead_run.ended_dead()
    ended_dead = all_reduce_sum([float(ended_dead)], state.env)[0] > 0
    if pruning:
        save_masks(state)
    if state.last_step < loop.steps and state.env.is_main:  # after the final checkpoint: ended early
        rf.write_final_state(
            state.files.path, {"last_step": state.last_step, "planned_steps": loop.steps, "ended": "deadline"}
        )
    barrier(state.env)
    if ended_dead and state.dead_run is not None:
        raise DeadRunError(state.dead_run.ended_line(state.files.path, state.cfg.optim.lr))
    return RunResult(
        run_dir=state.files.path,
        steps=state.last_step,
        final_loss=record.get("lm_loss", math.nan),
        eval_losses=state.last_eval,
        domain_weights=dict(zip(state.domains, state.sampler.weights)),
        times=state.times,
    )


# --- 1. set-up -------------------------------------------------------------------------------------


def set_up(
    cfg: PruneConfig | TrainConfig, files: rf.RunDir, resolved: Resolved, checkpoint: Path | None = None
) -> RunState:
    """Everything a run needs before its first step, resumed from `checkpoint` (`open_run_dir` chose
    it) when given."""
    loop, pruning, env = cfg.train, isinstance(cfg, PruneConfig), resolved.env
    resume = checkpoint is not None
    inputs = load_run_inputs(cfg, files, resolved, resume=resume, progress=env.is_main)
    source, data, resolved = inputs.source, inputs.data, inputs.resolved
    model, model_path, precision = source.model, source.path, resolved.precision
    teacher = load_teacher(cfg, source.tokenizer, model_path, env, precision) if cfg.distill.enabled else None
    l0 = lagrangian = None
    controller = None
    if pruning:
        p = cfg.pruning
        l0 = TargetController.make_l0(p.controller, model.args, resolved.target).to(env.device)
        l0.reset_parameters(torch.Generator().manual_seed(loop.seed))
        if p.scoring is not None and not resume:
            _initialise_masks(cfg, l0, model, data, resolved, files, inputs.scored)
        controller = TargetController(l0, p.controller, round(p.lagrangian_warmup_fraction * loop.steps))
        controller.start()  # a resumed run's checkpoint replaces what it sets
        lagrangian = controller.lagrangian
    previous = {} if pruning else rf.read_run_state(model_path)
    sampler, stream_start = initial_sampler(cfg, data, previous)
    resolved = dataclasses.replace(resolved, stream_start=stream_start)
    trainable = Trainable(model, l0, lagrangian)
    if env.strategy != "fsdp":  # FSDP2 runs are sharded while loading
        trainable.model = wrap_model(model, env, cfg.distributed.activation_checkpointing, precision)
    if loop.compile:
        for layer in model.model.layers:
            layer.compile()  # in place: parameter names and checkpoints stay the same
    optimizer = build_optimizer(
        model.parameters(),
        cfg.optim,
        log_alpha=l0.parameters() if l0 is not None else (),
        lambdas=lagrangian.parameters() if lagrangian is not None else (),
        pruning=cfg.pruning if pruning else None,
    )
    state = RunState(
        cfg=cfg,
        env=env,
        files=files,
        model=model,
        trainable=trainable,
        optimizer=optimizer,
        data=data,
        sampler=sampler,
        resolved=resolved,
        accumulation_steps=loop.accumulation_steps(env.world_size),
        teacher=teacher,
        controller=controller,
        dead_run=DeadRunGuard(loop.dead_steps, loop.steps, math.log(model.args.vocab_size), env.is_main),
        last_step=loop.steps,
    )
    _resume_or_start(state, checkpoint, previous)
    return state


def _initialise_masks(
    cfg: PruneConfig, l0: L0Module, model: CausalLM, data, resolved: Resolved, files, scored=None
) -> None:
    """`pruning.init`: order each row's initial log_alpha by a one-shot ranking (kept in scores.pt);
    `scored`: (scores, info) a budget's search already computed the same way."""
    env = resolved.env
    scores, info = run_scores(cfg, model, data, resolved, scored, progress=env.is_main)
    l0.reset_parameters_from_scores(scores, "oneshot" if cfg.pruning.init == "oneshot" else "ranked")
    if env.is_main:
        save_scores(files.scores, scores, model.args, info)


def _resume_or_start(state: RunState, checkpoint: Path | None, previous: dict[str, Any]) -> None:
    """Load `checkpoint` into `state`, or (None) measure the reference losses of a new run.

    Nothing in the run directory changes before the checkpoint has loaded and matched the config.
    """
    files, env = state.files, state.env
    if checkpoint is None:
        reference = read_reference_losses(state.cfg.data.reference_losses, state.domains, previous)
        # `source`: the model's own loss before any training, unmasked, on the split DBL compares
        decision = state.data.decision_split
        state.reference = reference if reference is not None else state.evaluate(None, decision).loss
        if env.is_main:
            ckpt.remove_leftovers(files.path, state.cfg.train.keep_checkpoints)
            save_config(state.resolved.config_to_save(state.cfg), files.config)
        return
    saved = ckpt.load_checkpoint(checkpoint, state.trainable, state.optimizer)
    batch = state.cfg.train.global_batch_size
    if saved["global_batch_size"] != batch:
        raise UserError(
            f"the checkpoint was trained with global_batch_size {saved['global_batch_size']}; "
            f"resume with the same value (got {batch})"
        )
    state.sampler.load_state_dict(saved["sampler"])
    state.resolved = dataclasses.replace(state.resolved, stream_start=f"checkpoint step {saved['step']}")
    state.step, state.tokens, state.history = saved["step"], saved["tokens"], saved["history"]
    if saved.get("last_step", state.last_step) < saved.get("planned_steps", state.last_step):
        state.last_step = saved["last_step"]  # a deadline shortened the run: its schedule stays compressed
    state.reference, state.resumed = saved["reference_losses"], True
    if env.is_main:
        ckpt.remove_leftovers(files.path, state.cfg.train.keep_checkpoints)
        save_config(
            state.resolved.config_to_save(state.cfg), files.next_resume_config()
        )  # the original config.yaml stays as it was


# --- 2. one step -----------------------------------------------------------------------------------


def train_step(state: RunState, step: int) -> dict[str, Any]:
    """One optimizer step (0-based `step`) over this rank's share of the global batch; its record.

    A non-finite loss or gradient norm stops the run before the optimizer step (`DivergenceError`),
    so nothing non-finite is ever written.
    """
    cfg, env, l0 = state.cfg, state.env, state.l0
    loop, accum = cfg.train, state.accumulation_steps
    t0 = time.perf_counter()
    set_learning_rates(
        state.optimizer,
        lr_multiplier(step, state.last_step, cfg.optim.warmup_fraction, cfg.optim.min_lr_ratio, loop.steps),
    )
    items = rank_slice(state.sampler.next_global_batch(loop.global_batch_size), env.rank, env.world_size)
    sums = torch.zeros(3, dtype=torch.float64)  # loss, ce, kd of this rank, averaged over micro-batches
    hard = l0 is not None and _hardening(state, step)
    hard_masks = l0.deterministic("target") if hard else None  # binary, no gradient to log_alpha
    for m in range(accum):
        micro = items[m * loop.micro_batch_size : (m + 1) * loop.micro_batch_size]
        ids = _gather(state.data, micro).to(env.device)  # (micro_batch, seq_len)
        masks = hard_masks
        if l0 is not None and not hard:
            l0.clamp_()
            masks = l0.sample(mask_generator(loop.seed, step, env.rank * accum + m))
        with gradient_sync(state.trainable.model, env, sync=m == accum - 1):
            parts = _micro_batch_loss(state, ids, masks)
            (parts.loss / accum).backward()
        sums += (
            torch.tensor([parts.loss.item(), parts.ce.item(), parts.kd.item()], dtype=torch.float64) / accum
        )
    lag_loss, lag_parts, target = _lagrangian_backward(state, step, hard)
    clipped = [state.model]
    if cfg.optim.clip_masks_with_model and l0 is not None:
        clipped += [l0] + ([state.lagrangian] if state.lagrangian is not None else [])
    grad_norm = _clip(clipped, cfg.optim.grad_clip)
    lm_loss, ce_loss, kd_loss = all_reduce_sum((sums / env.world_size).tolist(), env)
    if state.dead_run is not None:
        state.dead_run.observe(step + 1, ce_loss if state.teacher is not None else lm_loss, grad_norm)
    _stop_if_diverged(
        state, step + 1, {"loss": lm_loss, "Lagrangian": float(lag_loss.detach()), "gradient norm": grad_norm}
    )
    try:
        state.optimizer.step()
    except RuntimeError as e:  # a finite gradient times a huge learning rate: beyond float32
        if "overflow" not in str(e):
            raise
        raise _divergence(
            state, step + 1, f"the optimizer step overflows ({str(e).splitlines()[0]})"
        ) from None
    state.optimizer.zero_grad(set_to_none=True)
    if state.controller is not None and not hard:
        state.controller.after_step(step)
    tokens_per_step = loop.global_batch_size * state.data.seq_len
    state.tokens += tokens_per_step
    state.step = step + 1
    record = {
        "step": step + 1,
        "tokens": state.tokens,
        "loss": lm_loss + float(lag_loss.detach()),
        "lm_loss": lm_loss,
        "lag_loss": float(lag_loss.detach()),
        "lr": state.optimizer.param_groups[0]["lr"],
        "grad_norm": grad_norm,
        "tokens_per_s": tokens_per_step / (time.perf_counter() - t0),
    }
    if state.teacher is not None:
        record.update(ce_loss=ce_loss, kd_loss=kd_loss)
    if l0 is not None:
        record.update(_mask_record(state, target, lag_parts))
    record.update({rf.metric(rf.DOMAIN_WEIGHT, d): w for d, w in zip(state.domains, state.sampler.weights)})
    return record


def _watched_loss(state: RunState, record: dict[str, Any]) -> float:
    """The loss the dead-run guard watches in a metrics record: the data loss (CE when distilling)."""
    return float(
        record["ce_loss"] if state.teacher is not None and "ce_loss" in record else record["lm_loss"]
    )


def _micro_batch_loss(state: RunState, ids: torch.Tensor, masks: Masks | None) -> LossParts:
    """(1 - α)·CE + α·τ²·KD of one micro-batch (B, T) under `masks`, by the fused chunked loss."""
    distill = state.cfg.distill
    labels = next_token_labels(ids)  # (B, T)
    with state.resolved.precision.autocast():
        teacher_hidden = teacher_weight = None
        if state.teacher is not None:
            with torch.no_grad():
                teacher_hidden = state.teacher(ids, head=_hidden_states)  # (B, T, d_teacher)
            teacher_weight = teacher_output_weight(state.teacher)

        def head(hidden: torch.Tensor, weight: torch.Tensor) -> LossParts:
            return fused_loss(
                hidden,
                weight,
                labels,
                teacher_hidden=teacher_hidden,
                teacher_weight=teacher_weight,
                alpha=distill.alpha if state.teacher is not None else 0.0,
                temperature=distill.temperature,
                top_k=distill.top_k,
                chunk_size=state.cfg.train.loss_chunk_tokens,
            )

        return state.trainable.model(ids, masks, head=head)


def _hidden_states(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return hidden


class DivergenceError(UserError):
    """The run produced a non-finite loss or gradient; it stopped before writing anything of it."""


class DeadRunError(UserError):
    """The run ended with a dead model (uniform predictions, zero gradient); its files stay."""


def _stop_if_diverged(state: RunState, step: int, values: dict[str, float]) -> None:
    """Raise `DivergenceError` (one line, exit 2) naming the first non-finite value, if any."""
    bad = {name: v for name, v in values.items() if not math.isfinite(v)}
    if bad:
        name, value = next(iter(bad.items()))
        raise _divergence(state, step, f"the {name} is {value}")


def _divergence(state: RunState, step: int, what: str) -> DivergenceError:
    """The `DivergenceError` of what went wrong at the 1-based `step`, naming the checkpoint to go back
    to (the newest whose weights still gave a finite, live loss; a dead or non-finite one is no use)."""
    lr = f"optim.lr (now {state.cfg.optim.lr:g})"
    checkpoints = ckpt.list_checkpoints(state.files.path)
    good = state.dead_run.last_good(checkpoints) if state.dead_run is not None else None
    if not checkpoints:
        where = f"no checkpoint was written yet; start again with a lower {lr}"
    elif good is None:
        where = (
            f"no checkpoint is good: the loss after each was non-finite or dead (newest {checkpoints[-1].name}); "
            f"start again with a lower {lr}, with --restart or in another --run-dir"
        )
    elif good == checkpoints[-1]:
        where = (
            f"the last checkpoint with a finite, non-dead loss is {good}; --resume from it with a lower {lr}"
        )
    else:
        newer = ", ".join(c.name for c in checkpoints[checkpoints.index(good) + 1 :])
        where = (
            f"the last checkpoint with a finite, non-dead loss is {good}; the newer {newer} came after the damage: "
            f"move them aside to --resume from it with a lower {lr}"
        )
    return DivergenceError(f"step {step}: {what}; the run stopped and wrote nothing from this step ({where})")


class DeadRunGuard:
    """Watches for a dead run: the loss at ln V (uniform predictions) with a zero gradient, a run whose
    weights were destroyed (e.g. by a huge learning rate) but that is not NaN.

    Warns once when the run has been dead for `threshold` steps: `train.dead_steps`, or `FRACTION`
    of the run when that is shorter (a short run is over before 20 dead steps), at least
    `MIN_STEPS`; 0 never. `ended_dead()` tells whether the run ends so (the loop then exits non-zero).
    It also remembers which steps had a finite, live loss: the checkpoint before such a step is good.
    """

    LOSS_TOLERANCE = 1e-3  # nats from ln V
    GRAD_TOLERANCE = 1e-8
    FRACTION = 0.2  # of the run's steps
    MIN_STEPS = 2  # one flat step is not yet a dead run

    def __init__(self, dead_steps: int, total_steps: int, uniform_loss: float, report: bool = True):
        self.threshold = (
            0
            if dead_steps == 0
            else max(self.MIN_STEPS, min(dead_steps, math.ceil(self.FRACTION * total_steps)))
        )
        self.uniform_loss, self.report = uniform_loss, report
        self.count, self.warned = 0, False
        self.alive: dict[int, bool] = {}  # 1-based step -> its loss was finite and not dead

    def observe(self, step: int, loss: float, grad_norm: float, quiet: bool = False) -> None:
        """Record the loss and gradient norm of the 1-based `step`; warn (once) when the run is dead."""
        # a non-finite gradient is no sign of life either
        dead = abs(loss - self.uniform_loss) < self.LOSS_TOLERANCE and not grad_norm >= self.GRAD_TOLERANCE
        self.alive[step] = math.isfinite(loss) and not dead
        self.count = self.count + 1 if dead else 0
        if self.ended_dead() and not self.warned and not quiet:
            self.warned = True
            if self.report:
                print(
                    f"\nsheared: warning: step {step}: the loss has been {loss:.4f} = ln(vocabulary) with a zero "
                    f"gradient for {self.count} steps: the model predicts uniformly and no longer learns (a too "
                    "high learning rate?); stop it and start again with a lower optim.lr",
                    file=sys.stderr,
                )

    def ended_dead(self) -> bool:
        """Whether the steps observed so far end in `threshold` or more dead ones."""
        return bool(self.threshold) and self.count >= self.threshold

    def last_good(self, checkpoints: list[Path]) -> Path | None:
        """The newest of `checkpoints` whose weights gave a finite, live loss at the next step."""
        for path in reversed(checkpoints):
            if self.alive.get(rf.checkpoint_step(path) + 1):
                return path
        return None

    def ended_line(self, run_dir: Path, lr: float) -> str:
        """The one line of a run that ended dead."""
        last = max(self.alive)
        return (
            f"the run ended dead: from step {last - self.count + 1} to its last step {last} the loss was "
            f"{self.uniform_loss:.4f} = ln(vocabulary) with a zero gradient (the model predicts uniformly); its "
            f"files stay in {run_dir}; start again with a lower optim.lr (now {lr:g}), with --restart or in "
            "another --run-dir"
        )


def _keep_deadline(state: RunState, done: int, record: dict[str, Any], bar: tqdm) -> None:
    """Shorten the run when its deadline says so (rank 0 decides; every rank follows)."""
    if state.deadline is None:
        return
    last = state.last_step
    if state.env.is_main:
        last = state.deadline.last_step(
            done, last, state.times, state.cfg.train.is_eval_step, state.cfg.train.is_save_step
        )
    last = round(all_reduce_sum([float(last if state.env.is_main else 0)], state.env)[0])
    if last < state.last_step:
        state.last_step = last
        record["last_step"] = last
        bar.total = last
        bar.refresh()
        if state.env.is_main:
            tqdm.write(
                f"sheared: at this speed ({state.times.step():.2f} s/step) the run ends at step {last} of "
                f"{state.cfg.train.steps} to keep its deadline; its learning rate decays to the end by then"
            )


def _hardening(state: RunState, step: int) -> bool:
    """Whether the 0-based `step` trains under the exact-target masks (`pruning.harden_fraction`)."""
    steps = state.cfg.train.steps
    return step >= steps - round(state.cfg.pruning.harden_fraction * steps)


def _lagrangian_backward(
    state: RunState, step: int, hard: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """Backward of the Lagrangian term (the Lagrangian controller, before hardening), then the average
    of the replicated mask gradients over ranks: (its value, its parts, the warmed-up targets)."""
    controller = state.controller
    if controller is None:
        return torch.zeros(()), {}, {}
    target = controller.target(step)
    if hard:  # binary masks: log_alpha gets no gradient
        return torch.zeros(()), {}, target
    lag_loss, lag_parts = controller.constraint(step)
    if controller.lagrangian is not None:
        lag_loss.backward()
    # log_alpha (and the multipliers) are replicated: average what each rank's micro-batches gave them
    replicated = [*controller.l0.parameters()]
    replicated += [*controller.lagrangian.parameters()] if controller.lagrangian is not None else []
    average_gradients(replicated, state.env)
    return lag_loss, lag_parts, target


@torch.no_grad()
def _mask_record(
    state: RunState, target: dict[str, float], lag_parts: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Sparsity, multipliers and expected parameters after the step (pruning runs)."""
    l0, lagrangian = state.l0, state.lagrangian
    record: dict[str, Any] = {}
    for name, s_hat in l0.expected_sparsity().items():
        record[rf.metric(rf.EXPECTED_SPARSITY, name)] = s_hat.mean().item()
        record[rf.metric(rf.TARGET_SPARSITY, name)] = target[name]
        if lagrangian is not None:
            record[rf.metric(rf.LAMBDA1, name)] = lagrangian.lambda1[name].item()
            record[rf.metric(rf.LAMBDA2, name)] = lagrangian.lambda2[name].item()
        if name in lag_parts:
            record[rf.metric(rf.LAG_LOSS, name)] = lag_parts[name].item()
    record["expected_params"] = l0.expected_num_params().item()
    return record


def _gather(data: PreparedData, items: list[tuple[int, int]]) -> torch.Tensor:
    """Token ids (len(items), seq_len) of (domain index, sequence index) pairs, in order."""
    rows = [data.sequences(data.domains[d], "train", [i]) for d, i in items]
    return torch.cat(rows, dim=0)


def _clip(modules: list[nn.Module], max_norm: float) -> float:
    """Clip the gradients of `modules` to one global norm (0: do not clip); returns that norm.

    The model alone by default; with `optim.clip_masks_with_model` also log_alpha and the lambdas,
    as the reference implementation did (its norm mixes FSDP2's sharded and replicated gradients).
    """
    limit = max_norm if max_norm > 0 else math.inf
    groups = [[p for p in m.parameters() if p.grad is not None] for m in modules]
    if len(groups) == 1:
        return _full_norm(torch.nn.utils.clip_grad_norm_(groups[0], limit))
    norms = [_full_norm(torch.nn.utils.clip_grad_norm_(g, math.inf)) for g in groups if g]
    total = math.sqrt(sum(n * n for n in norms))
    coefficient = min(limit / (total + 1e-6), 1.0)  # as clip_grad_norm_
    for group in groups:
        for p in group:
            p.grad.mul_(coefficient)
    return total


def _full_norm(norm: torch.Tensor) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2


def _progress_line(state: RunState, record: dict[str, Any]) -> dict[str, str]:
    line = {"loss": f"{record['lm_loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
    if state.l0 is not None:
        target = parameter_counts(state.l0.target.model_args(state.l0.source))["num_params"]
        line["params"] = f"{record['expected_params'] / 1e6:.2f}M→{target / 1e6:.2f}M"
    return line


# --- 3. evaluation and dynamic batch loading ------------------------------------------------------


def evaluate_and_reweight(state: RunState) -> dict[str, Any]:
    """Per-domain held-out loss after the current step, then the DBL update of the domain weights from
    the validation split's losses (SPEC §11: the reported split decides nothing; data prepared without
    a validation split falls back to the held-out split, as the plan says)."""
    data_cfg, domains = state.cfg.data, state.domains
    eval_masks = None
    if state.l0 is not None:  # after hardening began: the exact-target masks it trains under
        eval_masks = state.l0.deterministic("target" if _hardening(state, state.step - 1) else "expected")
    measured = state.evaluate(eval_masks)
    losses = measured.loss
    decision = state.data.decision_split
    validation = losses if decision == "eval" else state.evaluate(eval_masks, decision).loss
    if data_cfg.dynamic:
        state.sampler.set_weights(
            update_domain_weights(
                state.sampler.weights,
                [validation[d] for d in domains],
                [state.reference[d] for d in domains],
                eta=data_cfg.eta,
                smoothing=data_cfg.smoothing,
                clip_excess=data_cfg.clip_excess,
            )
        )
    state.history.append(
        {"step": state.step, "eval_loss": losses, "weights": dict(zip(domains, state.sampler.weights))}
    )
    record = {rf.metric(rf.EVAL_LOSS, d): v for d, v in losses.items()}
    if decision != "eval":
        record.update({rf.metric(rf.VAL_LOSS, d): v for d, v in validation.items()})
    record.update({rf.metric(rf.REFERENCE_LOSS, d): state.reference[d] for d in domains})
    if measured.kl is not None:
        record.update({rf.metric(rf.EVAL_KL, d): v for d, v in measured.kl.items()})
    return record


# --- 4. saving -------------------------------------------------------------------------------------


def save(state: RunState) -> Path:
    """A checkpoint of the state after the current step (every rank calls this)."""
    trainer_state = {
        "step": state.step,
        "tokens": state.tokens,
        "last_step": state.last_step,
        "planned_steps": state.cfg.train.steps,
        "world_size": state.env.world_size,
        "global_batch_size": state.cfg.train.global_batch_size,
        "sampler": state.sampler.state_dict(),
        "history": state.history,
        "reference_losses": state.reference,
        "domains": state.domains,
    }
    return ckpt.save_checkpoint(
        state.files.path,
        state.step,
        state.trainable,
        state.optimizer,
        trainer_state,
        state.cfg.train.keep_checkpoints,
    )


def save_masks(state: RunState) -> None:
    """The final exact-target masks, checked identical on every rank, written by rank 0."""
    l0 = state.l0
    final = l0.deterministic("target")
    tensors = {name: getattr(final, name) for name in final.names()}
    assert_same_on_all_ranks(tensors, state.env)
    if not state.env.is_main:
        return
    with torch.no_grad():
        gap = {
            name: float(s.mean() - l0.specs[name].target_sparsity)
            for name, s in l0.expected_sparsity().items()
        }
    summary = kept_structure(l0.source, final).summary()
    summary["expected_minus_target_sparsity"] = gap
    summary["target"] = vars(l0.target)
    rf.save_final_masks(
        state.files.path,
        tensors,
        {
            "log_alpha": dict(l0.log_alpha.items()),
            "target": vars(l0.target),
            "source": vars(l0.source),
            "summary": summary,
        },
    )
