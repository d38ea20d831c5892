"""What holds the masks to the target during pruning (`pruning.controller`, SPEC §3 and §11).

- `lagrangian` (the paper): lag = λ1·(ŝ − t) + λ2·(ŝ − t)² per mask type, added to the loss; the
  multipliers climb it by gradient ascent. Exact only on long runs (it oscillates, with a period of
  tens of steps, and winds up on short ones: docs/method.md).
- `projection`: after every optimiser step each mask row's log_alpha is shifted by one scalar so
  that its expected sparsity equals the warmed-up target exactly (`projection.project_`). No
  multipliers; the masks learn the order and spread of log_alpha within each row.

Both warm the target up linearly from 0 over `warmup_steps`. The training loop and the
model-free test of tests/pruning/test_controller.py drive the same object.
"""

from __future__ import annotations

from typing import Literal

import torch

from sheared.pruning.constraint import LagrangianConstraint, warmed_up_target
from sheared.pruning.l0 import L0Module
from sheared.pruning.projection import project_

CONTROLLERS = ("lagrangian", "projection")
Controller = Literal["lagrangian", "projection"]


class TargetController:
    """The warmed-up target of every step, and the controller that holds `l0` to it.

    Args:
        l0: the masks (built with `clamp_in_place=False` for the projection controller).
        kind: `lagrangian` or `projection`.
        warmup_steps: steps over which the target rises linearly from 0.
    """

    def __init__(self, l0: L0Module, kind: Controller, warmup_steps: int):
        if kind not in CONTROLLERS:
            raise ValueError(f"controller must be one of {', '.join(CONTROLLERS)}, got {kind!r}")
        self.l0, self.kind, self.warmup_steps = l0, kind, warmup_steps
        self.lagrangian = (
            LagrangianConstraint(l0.specs).to(next(l0.parameters()).device) if kind == "lagrangian" else None
        )

    @classmethod
    def make_l0(cls, kind: Controller, *args, **kwargs) -> L0Module:
        """An L0 module as `kind` needs it (the projection controller keeps order beyond the clamp)."""
        return L0Module(*args, clamp_in_place=kind != "projection", **kwargs)

    @classmethod
    def saved_modules(cls, kind: Controller, *args, **kwargs) -> tuple[L0Module, LagrangianConstraint | None]:
        """The masks and multipliers as a run with `kind` saves them (what loads its checkpoints)."""
        l0 = cls.make_l0(kind, *args, **kwargs)
        return l0, LagrangianConstraint(l0.specs) if kind == "lagrangian" else None

    def target(self, step: int) -> dict[str, float]:
        """Every mask type's target sparsity at the 0-based `step`."""
        return warmed_up_target(self.l0.target_sparsity(), step, self.warmup_steps)

    def start(self) -> None:
        """Before the first step of a new run: the projection puts the masks on the target of step 0."""
        if self.kind == "projection":
            project_(self.l0.log_alpha, self.target(0), self.l0.log_alpha_min)

    def constraint(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The term added to the loss at `step` and its part per mask type (the Lagrangian; zero for
        the projection)."""
        if self.lagrangian is None:
            return torch.zeros(()), {}
        return self.lagrangian(self.l0.expected_sparsity(), self.target(step))

    def after_step(self, step: int) -> None:
        """After the optimiser step of the 0-based `step`: the projection onto the next step's target."""
        if self.kind == "projection":
            project_(self.l0.log_alpha, self.target(step + 1), self.l0.log_alpha_min)
