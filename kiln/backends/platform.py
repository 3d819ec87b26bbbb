"""Which backend and platform this process runs on.

Backend choice on CPU, measured on the development machine (BENCHMARKS.md): where the CPU has bfloat16 dot
instructions (AVX512_BF16 or AMX), PyTorch's oneDNN bfloat16 matmuls run ~3.9x faster than its float32 ones and
~1.2-1.5x faster than XLA:CPU's float32 (XLA's own bfloat16 dots are slower still), so `auto` picks the torch
backend there; elsewhere it keeps XLA.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

BACKENDS = ("auto", "jax", "torch")      # what --backend offers; "mock" (backends/mock, tests) is also accepted


def jax_platform() -> str:
    """cpu, gpu (CUDA/ROCm) or tpu, as XLA reports its default device."""
    import jax
    return jax.default_backend()


def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def cpu_has_bf16_dot() -> bool:
    """Whether the host CPU has bfloat16 dot-product instructions (x86 AVX512_BF16 / AMX, ARM BF16)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_backend(backend: str, platform: str) -> str:
    """auto: torch on a CPU with bf16 dot instructions when PyTorch is installed, else jax."""
    if backend == "mock":
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch" and platform != "cpu":
        raise ValueError(f"the torch backend runs on CPU only; this process's device is {platform!r}")
    if backend == "torch" and importlib.util.find_spec("torch") is None:
        raise ValueError("backend torch needs PyTorch: pip install torch")
    if backend != "auto":
        return backend
    if platform == "cpu" and cpu_has_bf16_dot() and importlib.util.find_spec("torch") is not None:
        return "torch"
    return "jax"
