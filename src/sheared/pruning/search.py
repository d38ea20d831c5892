"""Budget targets: every valid uniform shape within 1% of a budget, ranked (docs/method.md).

A candidate keeps the source's head_dim and family and is uniform (every layer alike):
`L_T ≤ L` layers, `G_T ≤ G` KV groups with `r_T ≤ r` query heads each (`H_T = G_T·r_T`), hidden and
intermediate widths that are multiples of `width_multiple` (or the source's own width), and it is
not the source itself. Its budget amount (`TargetBudget.amount`) lies within `BUDGET_TOLERANCE`
of the budget.

Ranking:

- **rule** (no data, no weights): by *imbalance*, the spread `ln(max ρ / min ρ)` of the five
  shrink ratios `ρ = (L_T/L, d_T/d, H_T/H, G_T/G, I_T/I)`, so the most uniformly scaled model comes
  first; then by distance to the budget; then by more layers. Of the shapes with the same
  (layers, query heads, KV groups) only the best ranked is listed, so the list spans depth and
  heads instead of neighbouring widths of one shape.
- **loss** (Minitron's search): the first `num_candidates` of that list are measured by a
  caller-given function (the run's: the calibration loss under the candidate's one-shot masks);
  the lowest wins, ties to the better rule rank.

Knows shapes and counts only; the caller brings the measurement.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sheared.errors import UserError
from sheared.model.args import ModelArgs, describe, parameter_counts
from sheared.pruning.target import SHAPE_KEYS, TargetBudget, TargetShape

BUDGET_TOLERANCE = 0.01  # a candidate's amount lies within 1% of the budget (relative)
DEFAULT_WIDTH_MULTIPLE = 64  # hidden and intermediate widths: multiples of this (tensor-core friendly)


@dataclass(frozen=True)
class Candidate:
    """One valid shape within the tolerance, with its counts and ranking numbers."""

    shape: TargetShape
    num_params: int
    """Total parameters (embeddings included)."""
    num_params_non_embedding: int
    """Parameters without `embed_tokens` / `lm_head`."""
    amount: float
    """What the budget measures of this shape (parameters, non-embedding parameters or MB)."""
    off: float
    """amount / budget - 1."""
    imbalance: float
    """ln(max ρ / min ρ) of the five shrink ratios; 0 for a uniformly scaled model."""
    loss: float | None = None
    """Calibration loss under the candidate's one-shot masks, when measured."""

    def row(self) -> dict[str, Any]:
        """The candidate as a JSON-ready row."""
        return {
            **vars(self.shape),
            "num_params": self.num_params,
            "num_params_non_embedding": self.num_params_non_embedding,
            "amount": self.amount,
            "off_budget": self.off,
            "imbalance": self.imbalance,
            "calibration_loss": self.loss,
        }


@dataclass
class TargetSearch:
    """The outcome of a search: the ranked list, what was measured, and the shape to use."""

    budget: TargetBudget
    goal: float
    """The budget in the unit of `Candidate.amount`."""
    width_multiple: int
    num_valid: int
    """Valid shapes within the tolerance (before keeping one per (layers, heads, KV groups))."""
    ranked: list[Candidate]
    """One candidate per (layers, query heads, KV groups), in rule order, losses where measured."""
    chosen: Candidate
    ranking: str
    """`loss` (the lowest measured calibration loss) or `rule`."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What the caller adds to the record (how the losses were measured)."""

    def to_json(self) -> dict[str, Any]:
        """The record a run keeps (`target_search.json`)."""
        return {
            "budget": {self.budget.kind: getattr(self.budget, self.budget.kind), "dtype": self.budget.dtype},
            "budget_amount": self.goal,
            "tolerance": BUDGET_TOLERANCE,
            "width_multiple": self.width_multiple,
            "ranking": self.ranking,
            "num_valid_shapes": self.num_valid,
            **self.notes,
            "chosen": vars(self.chosen.shape),
            "candidates": [c.row() for c in self.ranked],
        }


def _widths(size: int, multiple: int) -> list[int]:
    """Allowed kept widths of a dimension of `size`: multiples of `multiple`, and `size` itself."""
    return sorted({*range(multiple, size + 1, multiple), size})


def _imbalance(source: ModelArgs, shape: TargetShape) -> float:
    ratios = [getattr(shape, k) / getattr(source, k) for k in SHAPE_KEYS]
    return math.log(max(ratios) / min(ratios))


def _candidate(source: ModelArgs, budget: TargetBudget, goal: float, shape: TargetShape) -> Candidate:
    counts = parameter_counts(shape.model_args(source))
    amount = budget.amount(counts)
    return Candidate(
        shape=shape,
        num_params=counts["num_params"],
        num_params_non_embedding=counts["num_params_non_embedding"],
        amount=amount,
        off=amount / goal - 1,
        imbalance=_imbalance(source, shape),
    )


def _amount_fn(source: ModelArgs, budget: TargetBudget) -> Callable[..., float]:
    def amount(layers: int, hidden: int, groups: int, per_group: int, intermediate: int) -> float:
        shape = TargetShape(layers, hidden, groups * per_group, groups, intermediate)
        return budget.amount(parameter_counts(shape.model_args(source)))

    return amount


def _shapes_near(
    source: ModelArgs, budget: TargetBudget, goal: float, width_multiple: int
) -> Iterator[tuple[TargetShape, bool]]:
    """Every shape whose amount lies in the tolerance window (True), and for every (hidden, KV
    groups, heads per group, layers) the nearest intermediate width on each side of it (False).

    The amount is affine in the layers and in their product with the intermediate width,
    `amount = a + L·(b + c·I)` (SPEC §3), so the window of I is solved for, not searched.
    """
    lo, hi = goal * (1 - BUDGET_TOLERANCE), goal * (1 + BUDGET_TOLERANCE)
    amount = _amount_fn(source, budget)
    inter = _widths(source.intermediate_size, width_multiple)
    i0 = inter[0]
    for hidden in _widths(source.hidden_size, width_multiple):
        for groups in range(1, source.num_key_value_heads + 1):
            for per_group in range(1, source.heads_per_group + 1):
                one = amount(1, hidden, groups, per_group, i0)
                per_layer = amount(2, hidden, groups, per_group, i0) - one  # b + c·i0
                c = amount(1, hidden, groups, per_group, i0 + 1) - one
                a, b = one - per_layer, per_layer - c * i0
                for layers in range(1, source.num_hidden_layers + 1):
                    first = bisect.bisect_left(inter, ((lo - a) / layers - b) / c - 1e-6)
                    last = bisect.bisect_right(inter, ((hi - a) / layers - b) / c + 1e-6)
                    for k in range(max(first - 1, 0), min(last + 1, len(inter))):
                        shape = TargetShape(layers, hidden, groups * per_group, groups, inter[k])
                        yield shape, first <= k < last


def search_target(
    source: ModelArgs,
    budget: TargetBudget,
    *,
    width_multiple: int = DEFAULT_WIDTH_MULTIPLE,
    num_candidates: int = 8,
    measure: Callable[[TargetShape], float] | None = None,
) -> TargetSearch:
    """The valid uniform shapes within `BUDGET_TOLERANCE` of `budget`, ranked, and the one to use.

    Args:
        source: the source's shape.
        budget: the budget the target is given as.
        width_multiple: hidden and intermediate widths are multiples of this (or the source's own).
        num_candidates: how many of the rule-ranked list `measure` evaluates.
        measure: shape -> loss (lower is better), or None to rank by the rule alone.

    Raises:
        UserError: a budget at or above the source's, below the smallest valid shape, or with no
            valid shape within the tolerance (naming the nearest ones).
    """
    goal = budget.goal(parameter_counts(source))
    inside = valid_shapes(source, budget, width_multiple)
    ranked = rule_ranked(inside)
    chosen, ranking = ranked[0], "rule"
    if measure is not None:
        for i in range(min(num_candidates, len(ranked))):
            ranked[i] = replace(ranked[i], loss=float(measure(ranked[i].shape)))
        measured = [c for c in ranked if c.loss is not None]
        chosen, ranking = min(measured, key=lambda c: c.loss), "loss"  # min keeps the first of ties
    return TargetSearch(budget, goal, width_multiple, len(inside), ranked, chosen, ranking)


def valid_shapes(source: ModelArgs, budget: TargetBudget, width_multiple: int) -> list[Candidate]:
    """Every valid uniform shape within `BUDGET_TOLERANCE` of the budget (unranked).

    Raises:
        UserError: a budget at or above the source's, below the smallest valid shape, or with no
            valid shape within the tolerance (naming the nearest ones).
    """
    if width_multiple < 1:
        raise UserError(f"pruning.width_multiple must be at least 1, got {width_multiple}")
    counts = parameter_counts(source)
    goal, source_amount = budget.goal(counts), budget.amount(counts)
    if goal >= source_amount:
        raise UserError(
            f"the budget ({budget.describe()}) is not below the source's {amount_text(budget, source_amount)}; "
            "choose a smaller budget"
        )
    inside, nearest = _collect(source, budget, goal, width_multiple)
    if not inside:
        raise UserError(_no_candidate_message(source, budget, goal, width_multiple, nearest))
    return inside


def _collect(
    source: ModelArgs, budget: TargetBudget, goal: float, width_multiple: int
) -> tuple[list[Candidate], dict[str, Candidate]]:
    """The candidates within the tolerance, and the nearest valid shape below and above it."""
    inside: list[Candidate] = []
    nearest: dict[str, Candidate] = {}
    source_shape = TargetShape.of(source)
    for shape, in_window in _shapes_near(source, budget, goal, width_multiple):
        if shape == source_shape:
            continue
        candidate = _candidate(source, budget, goal, shape)
        if abs(candidate.off) <= BUDGET_TOLERANCE:  # exact counts decide, not the solved window
            inside.append(candidate)
        elif not in_window:
            side = "below" if candidate.off < 0 else "above"
            best = nearest.get(side)
            if best is None or abs(candidate.off) < abs(best.off):
                nearest[side] = candidate
    return inside, nearest


def rank_key(c: Candidate) -> tuple:
    """Rule order: imbalance, distance to the budget, more layers, then the shape (deterministic)."""
    s = c.shape
    return (
        round(c.imbalance, 9),
        round(abs(c.off), 9),
        -s.num_hidden_layers,
        tuple(-v for v in vars(s).values()),
    )


def rule_ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates in rule order, the best ranked of each (layers, query heads, KV groups) only."""
    seen: set[tuple[int, int, int]] = set()
    ranked = []
    for c in sorted(candidates, key=rank_key):
        key = (c.shape.num_hidden_layers, c.shape.num_attention_heads, c.shape.num_key_value_heads)
        if key not in seen:
            seen.add(key)
            ranked.append(c)
    return ranked


def amount_text(budget: TargetBudget, amount: float) -> str:
    """An amount in the budget's unit: `53,101,728 non-embedding parameters`, `100.0 MB`."""
    if budget.kind == "memory_mb":
        return f"{amount:,.1f} MB"
    return f"{amount:,.0f} {'parameters' if budget.kind == 'params' else 'non-embedding parameters'}"


def _no_candidate_message(
    source: ModelArgs,
    budget: TargetBudget,
    goal: float,
    width_multiple: int,
    nearest: dict[str, Candidate],
) -> str:
    widths = lambda size: _widths(size, width_multiple)[0]  # noqa: E731
    smallest = TargetShape(1, widths(source.hidden_size), 1, 1, widths(source.intermediate_size))
    least = _candidate(source, budget, goal, smallest).amount
    if goal * (1 + BUDGET_TOLERANCE) < least:
        return (
            f"the budget ({budget.describe()} = {amount_text(budget, goal)}) is below the smallest valid shape "
            f"({describe(smallest)}: {amount_text(budget, least)}); choose a larger budget"
        )
    shown = [
        f"{describe(c.shape)} ({c.off:+.1%})"
        for side in ("below", "above")
        if (c := nearest.get(side)) is not None
    ]
    return (
        f"no valid shape lies within {BUDGET_TOLERANCE:.0%} of the budget ({budget.describe()} = "
        f"{amount_text(budget, goal)}) at width multiple {width_multiple}; the nearest "
        f"{'are' if len(shown) > 1 else 'is'} {' and '.join(shown)}: choose a budget near "
        f"{'one of them' if len(shown) > 1 else 'it'} or a smaller width multiple"
    )


def table(search: TargetSearch, top: int | None = None, *, mark: bool = True) -> list[str]:
    """The ranked candidates (the first `top`, and the chosen one) as printable lines, the chosen
    one marked `<- used` (unless not `mark`: a plan before the losses are measured)."""
    rows = search.ranked if top is None else search.ranked[: max(top, 1)]
    if search.chosen not in rows:
        rows = [*rows, search.chosen]
    measured = any(c.loss is not None for c in search.ranked)
    header = (
        f"{'#':>3} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} {'interm.':>7} {'params':>14} "
        f"{'non-embedding':>14} {'vs budget':>9} {'imbal.':>6}"
    )
    lines = [header + (f" {'calib. loss':>11}" if measured else "")]
    for c in rows:
        s = c.shape
        line = (
            f"{search.ranked.index(c) + 1:>3} {s.num_hidden_layers:>6} {s.hidden_size:>6} {s.num_attention_heads:>5} "
            f"{s.num_key_value_heads:>3} {s.intermediate_size:>7} {c.num_params:>14,} {c.num_params_non_embedding:>14,} "
            f"{c.off:>+9.2%} {c.imbalance:>6.3f}"
        )
        if measured:
            line += f" {c.loss:>11.4f}" if c.loss is not None else f" {'-':>11}"
        lines.append(line + ("  <- used" if mark and c is search.chosen else ""))
    return lines
