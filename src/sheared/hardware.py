"""The machine a command runs on: CPU model and feature flags, and the precision that suits it.

Benchmarks print `machine_summary()` so that every row of docs/benchmarks.md says where it was
measured; `cpu_bf16_support` decides `train.precision: auto` (`sheared.precision`, SPEC §10).
"""

from __future__ import annotations

import platform

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 matrix units


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith(name)).split(":", 1)[1].strip()
    except (OSError, StopIteration, IndexError):
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where it cannot be read."""
    flags = _cpuinfo_field("flags")
    return None if flags is None else flags.split()


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 matrix products natively, and what said so.

    Emulated bf16 (AVX2, or AVX-512 without the bf16 extension) is many times slower than fp32:
    a 1024² bf16 matmul took 4.6 s against 0.11 s in fp32 on an AVX2-only machine.
    """
    flags = cpu_flags()
    if flags is None:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return supported, f"oneDNN bf16 support {'found' if supported else 'missing'}"
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    if found:
        return True, f"CPU has {'/'.join(found)} ({capability})"
    return False, f"CPU lacks avx512_bf16/amx_bf16 ({capability}): bf16 would be emulated and slow"


SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_summary() -> str:
    """One line: CPU model, the flags that decide speed, threads, torch; and the GPU when there is one."""
    flags = cpu_flags() or []
    shown = " ".join(f for f in SHOWN_FLAGS if f in flags) or "none of " + "/".join(SHOWN_FLAGS)
    line = f"{cpu_model()}; flags: {shown}; {torch.get_num_threads()} threads; torch {torch.__version__}"
    if torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name()}"
    return line
