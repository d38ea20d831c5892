"""Dynamic batch loading (SPEC §5): the domain-weight update and scaling-law reference losses.

Pure functions on plain lists, aligned by domain order; they know nothing of models or files,
except `read_reference_losses`, which reads the JSON file of reference losses a user names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sheared.errors import UserError

DEFAULT_ETA = 1.0  # step size of the exponentiated update (Xia et al. 2023, Algorithm 1)
DEFAULT_SMOOTHING = 1e-4  # mixing with the uniform distribution keeps every domain alive
WEIGHT_SUM_TOLERANCE = 1e-6
# Scaling-law exponent search range for L(N) = a / N^b + c (variable projection over b).
EXPONENT_RANGE = (1e-4, 3.0)
EXPONENT_GRID = 4000
GOLDEN_ITERATIONS = 200


def validate_weights(weights: Sequence[float], what: str = "domain weights") -> list[float]:
    """Weights as floats if they are finite, non-negative and sum to 1 (±1e-6), else a UserError."""
    values = [float(w) for w in weights]
    if not values:
        raise UserError(f"{what} are empty; give one weight per domain")
    bad = [w for w in values if not math.isfinite(w) or w < 0]
    if bad:
        raise UserError(f"{what} must be finite and non-negative, got {bad[0]} in {values}")
    total = math.fsum(values)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise UserError(f"{what} must sum to 1, got {total:.6g} for {values}")
    return values


def weights_by_domain(
    weights: Mapping[str, float] | Sequence[float], domains: Sequence[str], what: str = "domain weights"
) -> list[float]:
    """Weights aligned with `domains`, from a mapping (every domain named once) or a list."""
    if isinstance(weights, Mapping):
        unknown = [d for d in weights if d not in domains]
        if unknown:
            raise UserError(f"{what} name unknown domain {unknown[0]!r}; the data has: {', '.join(domains)}")
        missing = [d for d in domains if d not in weights]
        if missing:
            raise UserError(
                f"{what} lack domain {missing[0]!r}; give a weight (possibly 0) for each of: {', '.join(domains)}"
            )
        values = [weights[d] for d in domains]
    else:
        values = list(weights)
        if len(values) != len(domains):
            raise UserError(
                f"{what} have {len(values)} entries for {len(domains)} domains ({', '.join(domains)})"
            )
    return validate_weights(values, what)


def read_reference_losses(
    spec: str | dict[str, float], domains: list[str], previous: dict[str, Any]
) -> dict[str, float] | None:
    """Reference losses per domain, or None when they must be measured on the source (`source`).

    `source` while continuing a pruned model means the pruning run's reference (the original
    source's losses), which the export keeps next to the model.

    Args:
        spec: A mapping domain -> loss; the path of a JSON file holding one (at its top level or
            under "reference_losses"); or "source".
        domains: The data's domains, in order.
        previous: The run state kept next to the model being continued (empty when pruning).

    Returns:
        domain -> loss in `domains` order, or None when they must be measured.

    Raises:
        UserError: If the file does not exist, or the losses lack a domain or name an unknown one.
    """
    if isinstance(spec, dict):
        values = spec
        where = "data.reference_losses"
    elif spec == "source":
        if previous.get("reference_losses") and set(previous["reference_losses"]) >= set(domains):
            return {d: float(previous["reference_losses"][d]) for d in domains}
        return None
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"data.reference_losses {spec!r} is neither 'source' nor an existing JSON file")
        loaded = json.loads(path.read_text())
        values = loaded.get("reference_losses", loaded)
        where = str(path)
    unknown = [d for d in values if d not in domains]
    missing = [d for d in domains if d not in values]
    if unknown or missing:
        problem = f"unknown domain {unknown[0]!r}" if unknown else f"no value for domain {missing[0]!r}"
        raise UserError(f"reference losses in {where}: {problem}; the data has: {', '.join(domains)}")
    return {d: float(values[d]) for d in domains}


def weights_proportional_to(sizes: Sequence[int | float]) -> list[float]:
    """Weights proportional to domain sizes (e.g. training tokens per domain)."""
    total = float(sum(sizes))
    if total <= 0 or any(s < 0 for s in sizes):
        raise UserError(f"domain sizes must be non-negative with a positive total, got {list(sizes)}")
    return [s / total for s in sizes]


def update_domain_weights(
    weights: Sequence[float],
    losses: Sequence[float],
    reference: Sequence[float],
    *,
    eta: float = DEFAULT_ETA,
    smoothing: float = DEFAULT_SMOOTHING,
    clip_excess: bool = True,
) -> list[float]:
    """One dynamic-batch-loading update of the domain weights.

    delta = max(loss - reference, 0) (or loss - reference with `clip_excess=False`, as the
    released code did); a = softmax(log w + eta * delta); w' = (1 - c) * a + c / k; normalised in
    float64.

    Args:
        weights: current weights, one per domain, summing to 1.
        losses: current per-domain eval losses.
        reference: per-domain reference losses.
        eta: step size (> 0).
        smoothing: c in [0, 1), the share of the uniform distribution mixed in.
        clip_excess: clip negative excess loss to 0 (the paper's Algorithm 1).

    Returns:
        The new weights, aligned with the inputs; every weight is at least `smoothing / k`.
    """
    w = validate_weights(weights)
    k = len(w)
    for name, values in (("losses", losses), ("reference losses", reference)):
        if len(values) != k:
            raise UserError(f"{name} have {len(values)} entries for {k} domain weights")
        if not all(math.isfinite(float(v)) for v in values):
            raise UserError(f"{name} must be finite, got {list(values)}")
    if not (eta > 0 and math.isfinite(eta)):
        raise UserError(f"eta must be a positive number, got {eta}")
    if not 0 <= smoothing < 1:
        raise UserError(f"smoothing must be in [0, 1), got {smoothing}")
    excess = np.asarray(losses, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if clip_excess:
        excess = np.maximum(excess, 0.0)
    with np.errstate(divide="ignore"):  # a zero weight stays zero before smoothing
        logits = np.log(np.asarray(w, dtype=np.float64)) + eta * excess
    logits -= logits.max()
    a = np.exp(logits)
    a /= a.sum()
    new = (1.0 - smoothing) * a + smoothing / k
    return (new / new.sum()).tolist()


def _fit_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares of y ≈ a * x + c: (a, c, squared residual)."""
    design = np.stack([x, np.ones_like(x)], axis=1)
    (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = float(np.sum((design @ np.array([a, c]) - y) ** 2))
    return float(a), float(c), residual


def fit_scaling_law(num_params: Sequence[int], losses: Sequence[float]) -> tuple[float, float, float]:
    """Fit L(N) = a / N^b + c by least squares; returns (a, b, c).

    For a fixed exponent b the model is linear in (a, c), so the fit searches b only (variable
    projection): a log-spaced grid, then golden-section refinement around the best grid point.
    This finds the global least-squares fit without an initial guess; with three sizes it
    interpolates them exactly, which is what the paper's fit (initial guess 406.4, 0.336, 0.69)
    converges to.
    """
    n = np.asarray(num_params, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if n.ndim != 1 or len(n) != len(y) or len(n) < 3:
        raise UserError(
            f"a scaling-law fit needs at least 3 model sizes with one loss each, got {len(n)} sizes and {len(y)} losses"
        )
    if np.any(n <= 0) or len(set(n.tolist())) != len(n):
        raise UserError(f"model sizes must be positive and distinct, got {list(num_params)}")
    log_n = np.log(n)

    def residual(b: float) -> float:
        return _fit_linear(np.exp(-b * log_n), y)[2]

    grid = np.geomspace(*EXPONENT_RANGE, EXPONENT_GRID)
    best = int(np.argmin([residual(b) for b in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    inv_phi = (math.sqrt(5) - 1) / 2
    for _ in range(GOLDEN_ITERATIONS):
        m1, m2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        if residual(m1) < residual(m2):
            hi = m2
        else:
            lo = m1
    b = (lo + hi) / 2
    a, c, _ = _fit_linear(np.exp(-b * log_n), y)
    return a, b, c


def fit_reference_losses(
    num_params: list[int], losses: dict[str, list[float]], target_num_params: int
) -> dict[str, float]:
    """Per-domain reference losses predicted by a scaling law at the target's parameter count.

    Args:
        num_params: parameter counts of several models of one family.
        losses: domain -> that domain's loss for each model, aligned with `num_params`.
        target_num_params: total parameters of the pruned target.

    Returns:
        domain -> a / target^b + c of that domain's fit.
    """
    if target_num_params <= 0:
        raise UserError(f"target_num_params must be positive, got {target_num_params}")
    out = {}
    for domain, values in losses.items():
        if len(values) != len(num_params):
            raise UserError(f"domain {domain!r} has {len(values)} losses for {len(num_params)} model sizes")
        a, b, c = fit_scaling_law(num_params, values)
        out[domain] = float(a / float(target_num_params) ** b + c)
    return out
