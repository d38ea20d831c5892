"""The L0 module: learned `log_alpha` per prunable structure, mask sampling and deterministic masks.

Creates only the mask types the target needs (see `target.mask_specs`). It produces `Masks`
objects; the decoder applies them. It is a module so that its parameters train, shard and
checkpoint like any other (they stay float32).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sheared.model.args import ModelArgs
from sheared.model.masks import Masks
from sheared.pruning import hard_concrete as hc
from sheared.pruning.importance import initial_log_alpha
from sheared.pruning.params import expected_num_params
from sheared.pruning.target import MaskSpec, TargetShape, mask_specs


class L0Module(nn.Module):
    """`log_alpha` for every structure the target prunes.

    Args:
        source: the source model's shape.
        target: the exact target shape.
        clamp_in_place: `clamp_` clamps the parameters themselves (the paper; the Lagrangian
            controller). False (the projection controller): the parameters keep their order beyond
            the bounds and only the values a forward pass reads are clamped.
    """

    def __init__(self, source: ModelArgs, target: TargetShape, clamp_in_place: bool = True):
        super().__init__()
        self.source = source
        self.target = target
        self.clamp_in_place = clamp_in_place
        self.log_alpha_min = hc.LOG_ALPHA_MIN if clamp_in_place else hc.PROJECTION_LOG_ALPHA_MIN
        self.specs: dict[str, MaskSpec] = {spec.name: spec for spec in mask_specs(source, target)}
        self.log_alpha = nn.ParameterDict(
            {
                name: nn.Parameter(torch.empty(spec.shape, dtype=torch.float32))
                for name, spec in self.specs.items()
            }
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """log_alpha ~ Normal(5, 0.01): every structure starts (almost surely) kept."""
        for p in self.log_alpha.values():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.copy_(hc.LOG_ALPHA_INIT_MEAN + hc.LOG_ALPHA_INIT_STD * noise)

    @torch.no_grad()
    def reset_parameters_from_scores(self, scores: dict[str, torch.Tensor], levels: str = "ranked") -> None:
        """log_alpha ordered in every row like one-shot `scores` (`levels`: `importance.initial_log_alpha`)."""
        for name, p in self.log_alpha.items():
            p.copy_(initial_log_alpha(scores[name], self.specs[name].target_kept, levels).to(p.device))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp log_alpha into [ln 0.01, ln 100]; called before every forward pass (a no-op when the
        clamp is not in place: `bounded` clamps what is read instead)."""
        if not self.clamp_in_place:
            return
        for p in self.log_alpha.values():
            p.clamp_(hc.LOG_ALPHA_MIN, hc.LOG_ALPHA_MAX)

    def bounded(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """`log_alpha` as a forward pass reads it: clamped into [ln 0.01, ln 100] (already so in place),
        or [PROJECTION_LOG_ALPHA_MIN, ln 100] under the projection controller."""
        return log_alpha if self.clamp_in_place else log_alpha.clamp(self.log_alpha_min, hc.LOG_ALPHA_MAX)

    def sample(self, generator: torch.Generator | None = None) -> Masks:
        """One hard concrete sample of every mask (noise from `generator`, on the CPU)."""
        masks = {}
        for name, log_alpha in self.log_alpha.items():
            u = hc.uniform_noise(log_alpha.shape, generator).to(log_alpha.device)
            masks[name] = hc.sample(self.bounded(log_alpha), u)
        return Masks(**masks)

    def scores(self) -> dict[str, torch.Tensor]:
        """P(z != 0) of every structure, differentiable."""
        return {name: hc.score(self.bounded(log_alpha)) for name, log_alpha in self.log_alpha.items()}

    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """ŝ_m = 1 - sum(score) / row size, along the last dimension (shape: the mask's leading dims)."""
        return {
            name: 1.0 - score.sum(-1) / self.specs[name].row_size for name, score in self.scores().items()
        }

    def target_sparsity(self) -> dict[str, float]:
        """t_m = 1 - target count / source count, before warm-up."""
        return {name: spec.target_sparsity for name, spec in self.specs.items()}

    def expected_num_params(self) -> torch.Tensor:
        """Expected total parameters under the current scores (float64)."""
        return expected_num_params(self.source, self.scores())

    @torch.no_grad()
    def deterministic(self, mode: Literal["expected", "target"]) -> Masks:
        """Binary masks keeping the entries with the largest log_alpha in every row.

        Args:
            mode: `expected` keeps round(expected kept count) per row (evaluation during
                pruning); `target` keeps exactly the target count per row (export).
        """
        masks = {}
        for name, log_alpha in self.log_alpha.items():
            if mode == "target":
                k = self.specs[name].target_kept
            else:
                k = torch.round(hc.score(self.bounded(log_alpha)).sum(-1)).long()
            masks[name] = hc.top_k_binary(log_alpha, k).to(log_alpha.device)
        return Masks(**masks)
