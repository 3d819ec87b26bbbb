"""kiln's own CPU kernels for the torch backend (csrc/), built once per machine and kept in the cache.

They are compiled for the host CPU (-march=native) with PyTorch's extension builder, into
$KILN_CACHE_DIR/kernels/<hash of source, torch install and CPU flags>, so a second process loads the built
library in milliseconds. The source is compiled from a copy in that folder: checkouts of the same source at
other paths share the build instead of rebuilding it for each other. Where no compiler is available the model
falls back to its torch-ops path (slower, same results), with a warning.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from kiln.backends.platform import cpu_flags
from kiln.config import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
QUANT_SOURCE = Path(__file__).parent / "csrc" / "quant.cpp"
PREFILL_SOURCE = Path(__file__).parent / "csrc" / "prefill_attention.cpp"
HEAD_DIMS = (16, 24, 32, 64, 128)   # the head_dim and block_size instances csrc/ builds
BLOCK_SIZES = (16,)
STALE_LOCK_S = 300                      # a build takes ~1 min; an older lock is an interrupted one
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]   # no infinities in the kernel
QUANT_CFLAGS = ["-O3", "-march=native", "-fopenmp"]   # IEEE rounding: the activation codes are reproducible


def decode_kernel(head_dim: int, block_size: int):
    """The decode-attention kernel for this shape, or None (the model then uses its torch-ops path)."""
    return load() if head_dim in HEAD_DIMS and block_size in BLOCK_SIZES else None


@functools.cache
def load():
    """The built extension module (`decode_attention`, `add_rms_norm`), or None where it cannot be built. The
    prefill-attention and GGUF-block modules are built (or loaded) here too, each in its own compiler process at
    the same time: the runner calls this once at start, and a serving step never builds."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:    # the compilers run as subprocesses: in parallel
        others = [pool.submit(load_prefill), pool.submit(load_quant)]
        mod = _build("kiln_cpu_kernels", SOURCE, CFLAGS)
        for f in others:
            f.result()
    return mod


def prefill_kernel(block_size: int):
    """The prefill-attention kernel (csrc/prefill_attention.cpp: `prefill_attention`) for this block size, or
    None (the model then uses its torch-ops path; scripts/bench_prefill.py replaces this function to time both)."""
    return load_prefill() if block_size % 16 == 0 else None


@functools.cache
def load_prefill():
    """The built prefill-attention module, or None where it cannot be built."""
    return _build("kiln_prefill_kernels", PREFILL_SOURCE, CFLAGS)


@functools.cache
def load_quant():
    """The GGUF-block matmul module (csrc/quant.cpp: `quant_matmul`, `quantize_rows`), or None."""
    return _build("kiln_quant_kernels", QUANT_SOURCE, QUANT_CFLAGS)


def _build(name: str, source: Path, cflags: list[str]):
    from torch.utils import cpp_extension
    text = source.read_text()
    headers = [h for h in sorted(source.parent.glob("*.h")) if f'#include "{h.name}"' in text]   # travel with it
    key = hashlib.sha256(source.read_bytes() + b"".join(h.read_bytes() for h in headers)
                         + torch.__version__.encode() + torch.__file__.encode()
                         + " ".join(cflags).encode() + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    build = cache_dir() / "kernels" / f"{'cpu' if name == 'kiln_cpu_kernels' else name}-{key}"
    build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"                    # torch's builder waits while this exists: a killed build leaves it
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("removing a stale kernel-build lock (%s) left by an interrupted build", lock)
        lock.unlink(missing_ok=True)
    if not (build / f"{name}.so").exists():
        log.info("building kiln's CPU kernels %s for this machine (once, ~1 min) into %s", source.name, build)
    for src in [*headers, source]:           # compiled from a copy: the build then names no checkout's path, so
        copy = build / src.name              # checkouts of one source share it
        if not copy.exists() or copy.read_bytes() != src.read_bytes():
            tmp = build / f".{src.name}.{os.getpid()}"
            tmp.write_bytes(src.read_bytes())
            os.replace(tmp, copy)
    t0 = time.perf_counter()
    try:
        mod = cpp_extension.load(name=name, sources=[str(copy)], extra_cflags=cflags,
                                 extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as e:   # no compiler, no headers, no ninja: the torch-ops path serves instead
        log.warning("could not build kiln's CPU kernels %s (%s); using the slower torch-ops path", source.name,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    log.info("CPU kernels %s loaded in %.1fs (%s)", source.name, time.perf_counter() - t0, build)
    return mod
