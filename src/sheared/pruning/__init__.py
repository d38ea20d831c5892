"""Pruning: hard concrete masks, the L0 module, the target constraint, parameter counts, compaction.

Knows shapes and masks; knows nothing of optimizers or data.
"""

from sheared.pruning.constraint import LagrangianConstraint
from sheared.pruning.l0 import L0Module
from sheared.pruning.target import MASK_TYPES, MaskSpec, TargetShape

__all__ = ["MASK_TYPES", "L0Module", "LagrangianConstraint", "MaskSpec", "TargetShape"]
