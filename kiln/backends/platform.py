"""Which backend and platform this process runs on."""
from __future__ import annotations


def jax_platform() -> str:
    """cpu, gpu (CUDA/ROCm) or tpu, as XLA reports its default device."""
    import jax
    return jax.default_backend()
