"""One-shot pruning (`pruning.method: activation | magnitude | random`): scores, then masks, no steps.

Writes the same run directory as learned pruning (resolved config, `metrics.jsonl` with one record
of the calibration pass and the pruned model's per-domain eval loss, `masks/`), plus `scores.pt`
and `final_state.json` in place of a checkpoint, so `sheared export`, `sheared report` and a
continued-pretraining run of the export work unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path

from sheared import run_dir as rf
from sheared.config import save_config
from sheared.data.dbl import read_reference_losses
from sheared.data.tokens import PreparedData
from sheared.pruning.compaction import kept_structure
from sheared.pruning.importance import select_masks
from sheared.pruning.params import expected_num_params
from sheared.pruning.target import mask_specs
from sheared.train.calibration import save_scores
from sheared.train.config import PruneConfig
from sheared.train.distributed import barrier
from sheared.train.metrics import MetricsWriter
from sheared.train.setup import Resolved, RunResult, evaluate, initial_sampler, load_run_inputs, run_scores


def run_oneshot(
    cfg: PruneConfig, files: rf.RunDir, resolved: Resolved, resume: bool, progress: bool
) -> RunResult:
    """Score, select the exact target, evaluate and write the run directory (`open_run_dir` already
    decided that the run starts here: a finished one is never done again)."""
    env = resolved.env
    if env.is_main:
        files.path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    inputs = load_run_inputs(cfg, files, resolved, resume=resume, progress=progress)
    data, resolved = inputs.data, inputs.resolved
    model = inputs.source.model.eval()  # sharded while loading under FSDP2; scoring needs no DDP wrapper
    if env.is_main:
        save_config(resolved.config_to_save(cfg), files.config)  # the exact target, also of a budget
    scores, info = run_scores(cfg, model, data, resolved, inputs.scored, progress=progress)
    specs = mask_specs(model.args, resolved.target)
    masks = select_masks(scores, specs)
    reference = (
        read_reference_losses(cfg.data.reference_losses, data.domains, {})
        or evaluate(model, data, cfg, resolved).loss
    )
    losses = evaluate(model, data, cfg, resolved, masks).loss
    weights = dict(zip(data.domains, initial_sampler(cfg, data, {})[0].weights))
    state = {
        "step": 0,
        "tokens": info["calibration_tokens"],
        "domains": data.domains,
        "domain_weights": weights,
        "reference_losses": reference,
        "eval_losses": losses,
        "method": cfg.pruning.method,
        "seconds": time.perf_counter() - t0,
    }
    if env.is_main:
        _write(
            files, resolved.target, model.args, scores, info, masks, specs, state, data, cfg.pruning.method
        )
    barrier(env)
    return _result(files.path, state, losses)


def _write(files, target, args, scores, info, masks, specs, state, data: PreparedData, method: str) -> None:
    save_scores(files.scores, scores, args, info)
    tensors = {name: getattr(masks, name) for name in masks.names()}
    summary = kept_structure(args, masks).summary()
    summary["expected_minus_target_sparsity"] = dict.fromkeys(tensors, 0.0)
    summary["target"] = vars(target)
    summary["method"] = method
    rf.save_final_masks(
        files.path, tensors, {"target": vars(target), "source": vars(args), "summary": summary}
    )
    record = {"step": 0, "tokens": state["tokens"], "calibration_seconds": info["seconds"]}
    for spec in specs:
        sparsity = 1.0 - tensors[spec.name].sum(-1) / spec.row_size
        record[rf.metric(rf.EXPECTED_SPARSITY, spec.name)] = sparsity.mean().item()
        record[rf.metric(rf.TARGET_SPARSITY, spec.name)] = spec.target_sparsity
    record["expected_params"] = expected_num_params(args, tensors).item()
    record.update({rf.metric(rf.DOMAIN_WEIGHT, d): w for d, w in state["domain_weights"].items()})
    record.update({rf.metric(rf.EVAL_LOSS, d): v for d, v in state["eval_losses"].items()})
    record.update({rf.metric(rf.REFERENCE_LOSS, d): state["reference_losses"][d] for d in data.domains})
    writer = MetricsWriter(files.path)
    writer.write(record)
    writer.close()
    rf.write_final_state(files.path, state)  # last: its presence marks a complete one-shot run


def _result(run_dir: Path, state: dict, losses: dict[str, float]) -> RunResult:
    return RunResult(
        run_dir=run_dir,
        steps=0,
        final_loss=float("nan"),
        eval_losses=losses,
        domain_weights=state["domain_weights"],
    )
