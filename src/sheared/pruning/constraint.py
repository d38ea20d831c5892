"""The Lagrangian target constraint (SPEC §3).

    lag_m = mean( lambda1_m * (ŝ_m - t_m) + lambda2_m * (ŝ_m - t_m)^2 )     (mean over rows)

The lambdas start at 0. They are trained by gradient *ascent* (their optimizer group has
`maximize=True`), so a mask type whose sparsity lags its target makes its lambda1 grow in
magnitude, which pushes its log_alpha harder; the model and log_alpha descend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


class LagrangianConstraint(nn.Module):
    """One (lambda1, lambda2) pair of scalars per mask type."""

    def __init__(self, mask_names: Iterable[str]):
        super().__init__()
        names = list(mask_names)
        self.lambda1 = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros((), dtype=torch.float32)) for n in names}
        )
        self.lambda2 = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros((), dtype=torch.float32)) for n in names}
        )

    def forward(
        self, expected_sparsity: Mapping[str, torch.Tensor], target_sparsity: Mapping[str, float]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total Lagrangian term and its part per mask type."""
        parts = {}
        for name, s_hat in expected_sparsity.items():
            gap = s_hat - target_sparsity[name]
            parts[name] = (self.lambda1[name] * gap + self.lambda2[name] * gap.pow(2)).mean()
        total = torch.stack(list(parts.values())).sum() if parts else torch.zeros(())
        return total, parts


def warmed_up_target(target_sparsity: Mapping[str, float], step: int, warmup_steps: int) -> dict[str, float]:
    """The target sparsity warmed up linearly from 0 over `warmup_steps` (full from then on)."""
    fraction = 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
    return {name: fraction * t for name, t in target_sparsity.items()}
