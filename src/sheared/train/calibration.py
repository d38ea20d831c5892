"""Scores of every structure for one-shot pruning and for initialised masks (SPEC §10).

Calibration sequences are the first `pruning.calibration` sequences of every domain's training
split (prepare shuffled the documents, so they are a random sample of each domain). Each
data-parallel rank runs its contiguous share, one sequence per forward pass (so a sequence's
statistics do not depend on what it is batched with), and the float64 sums are all-reduced: one
process and N processes give the same scores.

`scores.pt` holds `{"method", "scores": {name: tensor}, "source": ModelArgs fields, "calibration":
{...}}`; `pruning.scores: PATH` reuses it for another target of the same source.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sheared.data.tokens import PreparedData
from sheared.errors import UserError
from sheared.model import CausalLM, Masks
from sheared.model.args import ModelArgs
from sheared.pruning.hard_concrete import top_k_binary
from sheared.pruning.importance import (
    Scores,
    activation_stats,
    check_scores_shape,
    magnitude_scores,
    random_scores,
)
from sheared.pruning.target import TargetShape
from sheared.train.config import PruneConfig
from sheared.train.distributed import DistEnv, all_reduce_sum_


def calibration_items(data: PreparedData, per_domain: int) -> list[tuple[str, int]]:
    """(domain, sequence index) of every calibration sequence, in a fixed global order."""
    for domain in data.domains:
        available = data.num_sequences(domain, "train")
        if per_domain > available:
            raise UserError(
                f"pruning.calibration is {per_domain} sequences per domain but domain {domain!r} has "
                f"{available} training sequences; choose at most {available}"
            )
    return [(d, i) for d in data.domains for i in range(per_domain)]


def _batches(data: PreparedData, items: list[tuple[str, int]], env: DistEnv, progress: bool):
    """This rank's share, one sequence at a time; ranks with a shorter share pad with uncounted passes."""
    share = math.ceil(len(items) / env.world_size)
    mine = items[env.rank * share : (env.rank + 1) * share]
    for n in tqdm(range(share), desc="calibration", unit="seq", disable=not progress):
        domain, index = mine[n] if n < len(mine) else items[0]
        yield data.sequences(domain, "train", [index]).to(env.device), n < len(mine)


def _activation_scores(
    model: CausalLM | torch.nn.Module,
    args: ModelArgs,
    data: PreparedData,
    env: DistEnv,
    *,
    calibration: int,
    keep_layers: int | None,
    autocast_dtype: torch.dtype | None,
    progress: bool,
) -> Scores:
    """Activation scores of the full model; with `keep_layers`, the widths are scored again after
    dropping the layers block influence drops (`width_scores: after_depth`)."""
    items = calibration_items(data, calibration)

    def stats(masks: Masks | None) -> Scores:
        batches = _batches(data, items, env, progress)
        reduce = lambda t: all_reduce_sum_(t, env)  # noqa: E731
        return activation_stats(model, args, batches, masks, reduce, autocast_dtype).scores(args)

    scores = stats(None)
    if keep_layers is not None and keep_layers < args.num_hidden_layers:
        width = stats(Masks(layer=top_k_binary(scores["layer"].float(), keep_layers).to(env.device)))
        scores = {**width, "layer": scores["layer"]}
    return scores


def compute_scores(
    cfg: PruneConfig,
    model: torch.nn.Module,
    args: ModelArgs,
    data: PreparedData,
    env: DistEnv,
    *,
    target: TargetShape | None,
    method: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[Scores, dict[str, Any]]:
    """The scores `cfg.pruning` asks for (read from `pruning.scores` when given), and how they were made.

    `target`: the run's exact target (read by `width_scores: after_depth`); None scores the full
    model only, as a budget's search does. `method`: the scoring method (default: the run's own).
    """
    if cfg.pruning.scores is not None:
        return load_scores(cfg.pruning.scores, args)
    method, t0 = method or cfg.pruning.scoring, time.perf_counter()
    width_scores = cfg.pruning.width_scores if target is not None else "full"
    info: dict[str, Any] = {"method": method, "calibration_tokens": 0}
    if method == "random":
        scores = random_scores(args, cfg.train.seed)
    elif method == "magnitude":
        scores = magnitude_scores(model, args)
    else:
        was_training = model.training
        model.eval()
        scores = _activation_scores(
            model,
            args,
            data,
            env,
            calibration=cfg.pruning.calibration,
            keep_layers=target.num_hidden_layers if width_scores == "after_depth" else None,
            autocast_dtype=autocast_dtype,
            progress=progress,
        )
        model.train(was_training)
        passes = 2 if width_scores == "after_depth" else 1
        sequences = cfg.pruning.calibration * len(data.domains)
        info.update(
            calibration_sequences=sequences,
            calibration_tokens=sequences * data.seq_len * passes,
            width_scores=width_scores,
        )
    info["seconds"] = time.perf_counter() - t0
    return scores, info


def save_scores(path: Path, scores: Scores, args: ModelArgs, info: dict[str, Any]) -> None:
    """Write `scores.pt` (see the module docstring), atomically."""
    from sheared.files import atomic_write

    content = {"scores": {k: v.cpu() for k, v in scores.items()}, "source": vars(args), "calibration": info}
    atomic_write(path, lambda f: torch.save(content, f), binary=True)


def load_scores(path: str | Path, args: ModelArgs) -> tuple[Scores, dict[str, Any]]:
    """Scores from an earlier run's `scores.pt`, refused in one line if made for another source."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"pruning.scores {str(p)!r} does not exist; give the scores.pt of an earlier run")
    try:
        content = torch.load(p, map_location="cpu", weights_only=True)
        scores = content["scores"]
    except Exception as e:  # a truncated file, another pickle, a dict without scores
        raise UserError(f"pruning.scores {str(p)!r} is not a scores.pt written by sheared ({e})") from None
    check_scores_shape(scores, args, f"pruning.scores {str(p)!r}")
    info = {**content.get("calibration", {}), "reused_from": str(p), "calibration_tokens": 0}
    return scores, info
