"""The projection controller (SPEC §11): after each optimiser step, shift every mask row's
`log_alpha` by one scalar so that its expected sparsity equals the warmed-up target exactly.

ŝ_r(c) = 1 - mean_j score(clamp(log_alpha_rj + c)) is non-increasing in c, so the shift `c_r` with
ŝ_r(c_r) = t_r is found by bisection, for every row at once. What the masks learn is then the
*order* and the *spread* of `log_alpha` within each row; the level — and with it the expected
size of the model — is set exactly at every step, at any run length. No Lagrange multipliers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sheared.pruning import hard_concrete as hc

BISECTION_STEPS = 32  # the bracket is (log α max − lower bound) + the row's spread, ~12–30 wide: 32 halvings leave < 1e-8, below float32 resolution of a shift


@torch.no_grad()
def row_shift(
    log_alpha: torch.Tensor, target_sparsity: float, lower: float = hc.LOG_ALPHA_MIN
) -> torch.Tensor:
    """The shift c (shape: the leading dims of `log_alpha`) that brings every row (last dimension) of
    `log_alpha` to expected sparsity `target_sparsity`, with the clamp of every forward pass applied.

    `lower`: the clamp's lower bound. Targets outside what the clamp allows (every entry at its bound) give the shift to that bound.
    """
    la = log_alpha.double()
    want = 1.0 - target_sparsity  # mean score per row
    low = lower - la.amax(-1)  # (...) every entry at the lower bound or below
    high = hc.LOG_ALPHA_MAX - la.amin(-1)  # (...) every entry at the upper bound or above
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        kept = hc.score((la + mid[..., None]).clamp(lower, hc.LOG_ALPHA_MAX)).mean(-1)
        too_sparse = kept < want
        low = torch.where(too_sparse, mid, low)
        high = torch.where(too_sparse, high, mid)
    return ((low + high) / 2).to(log_alpha.dtype)


@torch.no_grad()
def project_(
    log_alpha: Mapping[str, torch.nn.Parameter],
    target_sparsity: Mapping[str, float],
    lower: float = hc.LOG_ALPHA_MIN,
) -> None:
    """Shift every mask type's `log_alpha` in place onto its (warmed-up) target sparsity.

    Not clamped: the order beyond the bounds is kept (a forward pass reads the clamped values,
    `L0Module.bounded`), so that a row lifted to the top early in the warm-up keeps its ranking."""
    for name, p in log_alpha.items():
        p.add_(row_shift(p, target_sparsity[name], lower)[..., None])
