"""A run's numeric precision, decided once: `train.precision` (auto | fp32 | bf16) resolved for the
device and the data-parallel strategy into one frozen `Precision` that every room reads.

This is the only module that chooses between `torch.bfloat16` and `torch.float32` for a run
(tests/test_layers.py checks it). The rules (SPEC §10):

- `auto` is bf16 on CUDA devices that support it and on CPUs with native bf16 matrix units
  (AVX-512 bf16 / AMX), fp32 elsewhere: emulated bf16 is tens of times slower than fp32.
- bf16 means bf16 *compute*: the weights, their optimizer state, masks, log_alpha and lambdas stay
  float32. Without FSDP2 that is autocast; under FSDP2 the `MixedPrecisionPolicy` gathers the
  parameters in bf16 (and reduces gradients in fp32) instead, so no autocast runs on top of it —
  for training steps, evaluation and calibration alike.
- The frozen distillation teacher is stored in bf16 on CUDA (it has no master weights to keep);
  on a CPU it stays float32 under autocast (bf16 storage buys nothing there).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from sheared.hardware import cpu_bf16_support

PRECISIONS = ("auto", "fp32", "bf16")
BYTES_PER_VALUE = {"fp32": 4, "bf16": 2}
# Storage dtypes a user names (`--dtype` of export, `--tp-dtype` of eval) and what they are.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a user-given name (`float32`, `bfloat16`, `float16`)."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {name!r}")
    return TORCH_DTYPES[name]


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """`fp32` or `bf16` for `train.precision` (`auto` decides by the hardware), and why (SPEC §10)."""
    if precision != "auto":
        return precision, "as configured"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return ("bf16" if supported else "fp32"), f"CUDA device {'supports' if supported else 'lacks'} bf16"
    supported, why = cpu_bf16_support()
    return ("bf16" if supported else "fp32"), why


@dataclass(frozen=True)
class Precision:
    """The resolved precision of one run on one device under one strategy."""

    name: Literal["fp32", "bf16"]
    """What the run computes in."""
    why: str
    """What decided it (the configured value, or what the hardware has)."""
    device_type: str = "cpu"
    """`cpu` or `cuda`."""
    sharded: bool = False
    """Parameters sharded by FSDP2 (its mixed-precision policy then replaces autocast)."""

    @classmethod
    def resolve(cls, precision: str, device: torch.device, strategy: str = "none") -> Precision:
        """`train.precision` resolved for `device` and `distributed.strategy` (after `auto`)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        name, why = resolve_precision(precision, device)
        return cls(name, why, device.type, strategy == "fsdp")

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of forward passes of this run's own (unsharded) model, or None."""
        return torch.bfloat16 if self.bf16 and not self.sharded else None

    @property
    def param_dtype(self) -> torch.dtype | None:
        """FSDP2's `MixedPrecisionPolicy.param_dtype` (None: the parameters' own float32)."""
        return torch.bfloat16 if self.bf16 else None

    @property
    def reduce_dtype(self) -> torch.dtype:
        """FSDP2's gradient reduction dtype: always float32."""
        return torch.float32

    @property
    def teacher_dtype(self) -> torch.dtype:
        """Storage dtype of a frozen teacher loaded whole (not sharded)."""
        return torch.bfloat16 if self.bf16 and self.device_type == "cuda" else torch.float32

    @property
    def bytes_per_value(self) -> int:
        """Bytes of one activation value in this precision (for memory estimates)."""
        return BYTES_PER_VALUE[self.name]

    def autocast(self) -> AbstractContextManager:
        """The autocast context of forward passes (a no-op in fp32 and under FSDP2)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    def describe(self) -> str:
        """One line, as the run's first line and the plan print it: `bf16 (CPU has avx512_bf16 ...)`."""
        return f"{self.name} ({self.why})"


FP32 = Precision("fp32", "as configured")
