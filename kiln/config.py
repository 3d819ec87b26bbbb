"""kiln's configuration: frozen, validated dataclasses. The ONLY module that reads environment variables.

`EngineConfig.create(spec, **kwargs)` turns user options (the `LLM(...)` keyword arguments and CLI flags)
into one immutable object once the model's spec is known, deriving what depends on it (max_model_len,
bucket ranges, the number of KV blocks).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from kiln.compile.buckets import BucketPlan, make_buckets
from kiln.compile.planner import MemoryPlan, host_free_bytes, plan_memory
from kiln.models.spec import ModelSpec

DTYPES = ("auto", "float32", "bfloat16")
QUANTIZATIONS = ("auto", "none")


def cache_dir() -> Path:
    """Root of kiln's on-disk state (models, graph cache): $KILN_CACHE_DIR or ~/.cache/kiln."""
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln").expanduser()


def models_dir() -> Path:
    return Path(os.environ.get("KILN_MODELS_DIR") or cache_dir() / "models").expanduser()


def bucket_range(name: str, given: tuple[int | None, ...] | None, default: tuple[int, int, int]) -> tuple[int, ...]:
    """(min, step, max) of one bucket dimension: a flag value wins, then KILN_<NAME>_BUCKET_{MIN,STEP,MAX}
    (or the VLLM_ spelling Gaudi users know), then the default derived from the engine limits."""
    out = []
    for i, part in enumerate(("MIN", "STEP", "MAX")):
        v = given[i] if given else None
        if v is None:
            env = os.environ.get(f"KILN_{name}_BUCKET_{part}") or os.environ.get(f"VLLM_{name}_BUCKET_{part}")
            v = int(env) if env else default[i]
        out.append(int(v))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"                  # auto: float32 for XLA on CPU (its f32 dots are fastest), else bfloat16
    backend: str = "auto"                # auto | jax | torch (backends/platform.resolve_backend)
    quantization: str = "auto"           # auto: keep 4-bit GGUF weights 4-bit where lossless (torch bf16) | none

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0                  # derived from kv_cache_gib or the planner when 0; block 0 is the null block
    kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks < 0 or self.kv_cache_gib <= 0:
            raise ValueError("num_blocks must be >= 0 and kv_cache_gib > 0")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64               # requests running at once (decode batch)
    max_num_batched_tokens: int = 2048   # tokens per prefill step, padding included
    max_model_len: int = 2048            # prompt + output tokens of one request

    def __post_init__(self):
        for f in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be at least 1, got {getattr(self, f)}")


def resolve_dtype(dtype: str, platform: str, backend: str = "jax") -> str:
    """auto: float32 for XLA on CPU (XLA:CPU runs f32 dots faster than bf16), else bfloat16 (accelerators, and
    PyTorch on CPU, whose oneDNN bf16 dots are the fast ones)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype if dtype != "auto" else ("float32" if platform == "cpu" and backend == "jax" else "bfloat16")


def xla_flags() -> str:
    """XLA_FLAGS as the process sees them: they change compiled graphs, so they are in graph-cache keys."""
    return os.environ.get("XLA_FLAGS", "")


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    warmup: bool = True                  # compile (or load from the graph cache) every planned bucket up front
    allow_lazy_compile: bool = False     # after warmup, compile a missing bucket (counted) instead of failing
    graph_cache: bool = True             # keep compiled graphs under $KILN_CACHE_DIR/graphs
    memory_utilization: float = 0.9      # share of free memory kiln may use (graphs + KV cache)
    graph_reserved_fraction: float = 0.1 # share of that reserved for compiled graphs when the KV size is auto
    graph_prompt_ratio: float = 0.3      # share of the graph budget for prefill graphs
    prefill_strategy: str = "min_tokens" # warmup order of prefill buckets: min_tokens | max_bs
    decode_strategy: str = "max_bs"      # warmup order of decode buckets: max_bs | min_tokens
    compile_workers: int = 2             # graphs compiled at once

    def __post_init__(self):
        from kiln.compile.planner import DECODE_STRATEGIES, PREFILL_STRATEGIES
        if self.prefill_strategy not in PREFILL_STRATEGIES:
            raise ValueError(f"prefill_strategy must be one of {PREFILL_STRATEGIES}, got {self.prefill_strategy!r}")
        if self.decode_strategy not in DECODE_STRATEGIES:
            raise ValueError(f"decode_strategy must be one of {DECODE_STRATEGIES}, got {self.decode_strategy!r}")
        for f in ("memory_utilization", "graph_reserved_fraction", "graph_prompt_ratio"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ValueError(f"{f} must be in [0, 1], got {getattr(self, f)}")

    @property
    def graph_cache_dir(self) -> Path:
        return cache_dir() / "graphs"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    buckets: BucketPlan
    compile: CompileConfig
    memory: MemoryPlan
    dtype: str                           # resolved: float32 or bfloat16
    backend: str = "jax"                 # resolved: jax or torch
    kv_dtype: str = "float32"            # resolved KV-cache dtype (kv_cache_dtype auto: the compute dtype)
    platform: str = "cpu"
    seed: int = 0

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.scheduler.max_model_len // self.cache.block_size)

    @classmethod
    def create(cls, spec: ModelSpec, *, model: str = ModelConfig.model, dtype: str = "auto",
               backend: str | None = None, quantization: str = "auto", kv_cache_dtype: str = "auto",
               block_size: int = 16, num_blocks: int = 0, kv_cache_gib: float | None = None,
               enable_prefix_caching: bool = True, max_num_seqs: int = 64,
               max_num_batched_tokens: int | None = None, max_model_len: int | None = None,
               seed: int = 0, platform: str = "cpu", free_bytes: int | None = None,
               buckets: dict[str, tuple[int, int, int]] | None = None,
               **compile_kwargs) -> "EngineConfig":
        from kiln.backends.platform import resolve_backend
        backend = backend or os.environ.get("KILN_BACKEND") or "auto"
        mc = ModelConfig(model=model, dtype=dtype, backend=backend, quantization=quantization)
        backend = resolve_backend(backend, platform)
        resolved = resolve_dtype(dtype, platform, backend)
        # kiln attends over the whole context: a sliding-window model is exact only within its window
        window = spec.sliding_window or spec.max_position_embeddings
        max_len = max_model_len or min(spec.max_position_embeddings, 2048, window)
        if max_len > window:
            raise ValueError(f"max_model_len={max_len} exceeds the model's sliding_window={window}; kiln does not "
                             f"implement sliding-window attention, so set --max-model-len {window} or less")
        if max_len > spec.max_position_embeddings:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                             f"{spec.max_position_embeddings}")
        sc = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens or max(2048, min(max_len, 8192)),
                             max_model_len=max_len)
        if compile_kwargs.get("warmup") is None:   # VLLM_SKIP_WARMUP is what Gaudi users know
            skip = os.environ.get("KILN_SKIP_WARMUP") or os.environ.get("VLLM_SKIP_WARMUP") or ""
            compile_kwargs["warmup"] = skip.lower() not in ("1", "true", "yes")
        comp = CompileConfig(**compile_kwargs)
        if kv_cache_gib is None:
            space = os.environ.get("KILN_KVCACHE_SPACE") or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
            # CPU: a fixed KV budget, as vLLM CPU's VLLM_CPU_KVCACHE_SPACE; accelerators: split free memory
            kv_cache_gib = float(space) if space else (1.0 if platform == "cpu" else None)
        if kv_cache_dtype not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(DTYPES)}, got {kv_cache_dtype!r}")
        if kv_cache_dtype != "auto" and backend != "torch" and kv_cache_dtype != resolved:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype} needs backend torch; jax keeps the cache in dtype "
                             f"{resolved}")
        kv_dtype = resolved if kv_cache_dtype == "auto" else kv_cache_dtype
        itemsize = 4 if kv_dtype == "float32" else 2
        per_block = 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize
        if num_blocks:
            kv_bytes = num_blocks * per_block
        else:
            kv_bytes = None if kv_cache_gib is None else int(kv_cache_gib * 2**30)
        memory = plan_memory(free_bytes=host_free_bytes() if free_bytes is None else free_bytes,
                             memory_utilization=comp.memory_utilization,
                             graph_reserved_fraction=comp.graph_reserved_fraction,
                             graph_prompt_ratio=comp.graph_prompt_ratio, bytes_per_block=per_block,
                             block_size=block_size, max_model_len=max_len, kv_bytes=kv_bytes)
        cc = CacheConfig(block_size=block_size, num_blocks=num_blocks or memory.num_blocks,
                         kv_cache_gib=memory.kv_bytes / 2**30, enable_prefix_caching=enable_prefix_caching)
        blocks = -(-max_len // block_size)
        max_prompt = min(sc.max_num_batched_tokens, max_len)
        b = buckets or {}
        plan = BucketPlan(
            prompt_bs=make_buckets(*bucket_range("PROMPT_BS", b.get("prompt_bs"), (1, 32, min(max_num_seqs, 64)))),
            prompt_seq=make_buckets(*bucket_range("PROMPT_SEQ", b.get("prompt_seq"),
                                                  (block_size, max(block_size, 256), max_prompt))),
            decode_bs=make_buckets(*bucket_range("DECODE_BS", b.get("decode_bs"), (1, 32, max_num_seqs))),
            decode_blocks=make_buckets(*bucket_range("DECODE_BLOCK", b.get("decode_blocks"),
                                                     (min(4, blocks), 32, blocks))),
            max_prompt_tokens=sc.max_num_batched_tokens)
        if plan.decode_blocks[-1] < blocks:
            raise ValueError(f"the largest decode block bucket ({plan.decode_blocks[-1]}) must cover max_model_len="
                             f"{max_len} ({blocks} blocks of {block_size})")
        if plan.prompt_seq[-1] > max_prompt or not plan.required_buckets()[0]:
            raise ValueError(f"prompt seq_len buckets (max {plan.prompt_seq[-1]}) must fit max_num_batched_tokens="
                             f"{sc.max_num_batched_tokens} and max_model_len={max_len}")
        return cls(model=mc, cache=cc, scheduler=sc, buckets=plan, compile=comp, memory=memory, dtype=resolved,
                   backend=backend, kv_dtype=kv_dtype, platform=platform, seed=seed)
