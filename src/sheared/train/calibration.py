"""Scores of every structure for one-shot pruning and for initialised masks (SPEC §10).

Calibration sequences are the first `pruning.calibration` sequences of every domain's training
split (prepare shuffled the documents, so they are a random sample of each domain). Each
data-parallel rank runs its contiguous share, one sequence per forward pass (so a sequence's
statistics do not depend on what it is batched with), and the float64 sums are all-reduced: one
process and N processes give the same scores.

`scores.pt` holds `{"scores": {name: tensor}, "source": ModelArgs fields, "calibration": {...},
"fingerprint": {...}}`; `pruning.scores: PATH` reuses it for another target of the same source. The
fingerprint (`scores_fingerprint`) ties the scores to the source's weights and to the calibration
sequences they were measured on, so that scores of another model of the same shape, or of other data,
are refused rather than taken on trust (shapes alone cannot tell them apart).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sheared.data.tokens import PreparedData
from sheared.errors import UserError
from sheared.model import CausalLM, Masks
from sheared.model.args import ModelArgs
from sheared.model.loading import weights_fingerprint
from sheared.pruning.hard_concrete import top_k_binary
from sheared.pruning.importance import (
    Scores,
    activation_stats,
    check_scores_shape,
    magnitude_scores,
    non_finite_scores,
    random_scores,
)
from sheared.pruning.target import TargetShape
from sheared.run_dir import RunDir
from sheared.train.config import PruneConfig, PruningConfig
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
        return load_scores(cfg.pruning.scores, args, source=cfg.source_spec, data=data, note=env.is_main)
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
    problem = non_finite_scores(scores)
    if problem is not None:
        raise UserError(
            f"the {method} scores of {cfg.source_spec} are not finite ({problem}): the source's weights or the "
            "calibration data hold NaN or infinity"
        )
    calibration = cfg.pruning.calibration if method == "activation" else None
    info["fingerprint"] = scores_fingerprint(cfg.source_spec, data, calibration)
    return scores, info


def calibration_fingerprint(data: PreparedData, per_domain: int) -> str | None:
    """sha256 (hex) of the calibration sequences (domain names and token ids), or None when a domain has
    fewer than `per_domain` training sequences (they cannot be the same)."""
    if any(data.num_sequences(d, "train") < per_domain for d in data.domains):
        return None
    digest = hashlib.sha256()
    for domain in data.domains:
        digest.update(domain.encode("utf-8") + b"\0")
        rows = data.token_array(domain, "train")[:per_domain]  # (per_domain, seq_len), the on-disk dtype
        digest.update(rows.astype("<u4").tobytes())
    return digest.hexdigest()


def scores_fingerprint(source: str, data: PreparedData, calibration: int | None) -> dict[str, Any]:
    """What scores were measured from: the source's weights (`weights_fingerprint`) and, for activation
    scores, the first `calibration` training sequences of every domain (None for data-free scores)."""
    return {
        "source_weights": weights_fingerprint(source),
        "calibration_sequences_per_domain": calibration,
        "calibration_data": None if calibration is None else calibration_fingerprint(data, calibration),
    }


def check_scores_option(pruning: PruningConfig) -> None:
    """Refuse `pruning.scores` before anything runs: a folder instead of the file, or given where nothing
    reads scores (learned masks from a uniform init with an exact target, or a budget searched by rule)."""
    if pruning.scores is None:
        return
    p = Path(pruning.scores)
    if p.is_dir():
        scores_file = RunDir(p).scores
        inside = f" ({scores_file} is there)" if scores_file.is_file() else ""
        raise UserError(
            f"pruning.scores {str(p)!r} is a directory; give the scores.pt file of an earlier run{inside}"
        )
    searched = pruning.budget is not None and pruning.search == "loss"
    if pruning.scoring is None and not searched:
        raise UserError(
            f"pruning.scores is given but nothing uses scores: method {pruning.method} with init {pruning.init} "
            f"learns its masks from a uniform start; drop pruning.scores, or set pruning.init to activation, "
            "magnitude or oneshot"
        )


def save_scores(path: Path, scores: Scores, args: ModelArgs, info: dict[str, Any]) -> None:
    """Write `scores.pt` (see the module docstring), atomically."""
    from sheared.files import atomic_write

    calibration = {k: v for k, v in info.items() if k != "fingerprint"}
    content = {
        "scores": {k: v.cpu() for k, v in scores.items()},
        "source": vars(args),
        "calibration": calibration,
        "fingerprint": info.get("fingerprint"),
    }
    atomic_write(path, lambda f: torch.save(content, f), binary=True)


def load_scores(
    path: str | Path, args: ModelArgs, *, source: str, data: PreparedData, note: bool = True
) -> tuple[Scores, dict[str, Any]]:
    """Scores from an earlier run's `scores.pt`, refused in one line when they cannot be this run's: made
    for another shape, from other weights or calibration data (`scores_fingerprint`), or not finite. A
    file written before fingerprints existed is accepted on its shapes, with a one-line note (`note`)."""
    p = Path(path)
    where = f"pruning.scores {str(p)!r}"
    if p.is_dir():
        raise UserError(f"{where} is a directory; give the scores.pt file of an earlier run")
    if not p.is_file():
        raise UserError(f"{where} does not exist; give the scores.pt of an earlier run")
    try:
        content = torch.load(p, map_location="cpu", weights_only=True)
        scores = content["scores"]
    except Exception as e:  # a truncated file, another pickle, a dict without scores
        raise UserError(f"{where} is not a scores.pt written by sheared ({e})") from None
    check_scores_shape(scores, args, where)
    problem = non_finite_scores(scores)
    if problem is not None:
        raise UserError(f"{where} holds scores that are not finite ({problem}); compute them again")
    stored = content.get("fingerprint")
    if stored is None:
        if note:
            print(
                f"sheared: note: {where} has no fingerprint of its source and calibration data (written by an "
                "older sheared); only its shapes were checked",
                file=sys.stderr,
            )
    else:
        _check_fingerprint(
            where, stored, scores_fingerprint(source, data, stored["calibration_sequences_per_domain"])
        )
    info = {
        **content.get("calibration", {}),
        "reused_from": str(p),
        "calibration_tokens": 0,
        "fingerprint": stored,
    }
    return scores, info


def _check_fingerprint(where: str, stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse scores measured from other weights or other calibration sequences, naming which."""

    def short(value: str | None) -> str:
        return "none (a domain has fewer sequences)" if value is None else f"{value[:12]}…"

    differ = []
    if stored["source_weights"] != current["source_weights"]:
        differ.append(
            f"other source weights (fingerprint {short(stored['source_weights'])}, this source's "
            f"{short(current['source_weights'])})"
        )
    if stored["calibration_data"] != current["calibration_data"]:
        n = stored["calibration_sequences_per_domain"]
        differ.append(
            f"other calibration data (the first {n} training sequences of every domain: fingerprint "
            f"{short(stored['calibration_data'])}, this data's {short(current['calibration_data'])})"
        )
    if differ:
        raise UserError(
            f"{where} was computed from {' and '.join(differ)}; drop pruning.scores to compute them again"
        )
