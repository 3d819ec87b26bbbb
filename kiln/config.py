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
from kiln.models.spec import ModelSpec

DTYPES = ("auto", "float32", "bfloat16")


def cache_dir() -> Path:
    """Root of kiln's on-disk state (models, graph cache): $KILN_CACHE_DIR or ~/.cache/kiln."""
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln").expanduser()


def models_dir() -> Path:
    return Path(os.environ.get("KILN_MODELS_DIR") or cache_dir() / "models").expanduser()


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"                  # auto: float32 on CPU (XLA:CPU runs f32 dots fastest), else bfloat16

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0                  # derived from kv_cache_gib when 0; block 0 is the null block
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


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    buckets: BucketPlan
    dtype: str                           # resolved: float32 or bfloat16
    seed: int = 0

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.scheduler.max_model_len // self.cache.block_size)

    @classmethod
    def create(cls, spec: ModelSpec, *, model: str = ModelConfig.model, dtype: str = "auto",
               block_size: int = 16, num_blocks: int = 0, kv_cache_gib: float | None = None,
               enable_prefix_caching: bool = True, max_num_seqs: int = 64,
               max_num_batched_tokens: int | None = None, max_model_len: int | None = None,
               seed: int = 0, platform: str = "cpu") -> "EngineConfig":
        mc = ModelConfig(model=model, dtype=dtype)
        resolved = dtype if dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
        max_len = max_model_len or min(spec.max_position_embeddings, 2048)
        if max_len > spec.max_position_embeddings:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                             f"{spec.max_position_embeddings}")
        sc = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens or max(2048, min(max_len, 8192)),
                             max_model_len=max_len)
        if kv_cache_gib is None:
            space = os.environ.get("KILN_KVCACHE_SPACE") or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
            kv_cache_gib = float(space) if space else 1.0
        if not num_blocks:
            itemsize = 4 if resolved == "float32" else 2
            per_block = 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize
            num_blocks = max(2, int(kv_cache_gib * 2**30) // per_block)
        cc = CacheConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_gib=kv_cache_gib,
                         enable_prefix_caching=enable_prefix_caching)
        blocks = -(-max_len // block_size)
        max_prompt = min(sc.max_num_batched_tokens, max_len)
        env = lambda n, d: _env_int(n) or d
        plan = BucketPlan(
            prompt_bs=make_buckets(env("KILN_PROMPT_BS_BUCKET_MIN", 1), env("KILN_PROMPT_BS_BUCKET_STEP", 32),
                                   env("KILN_PROMPT_BS_BUCKET_MAX", min(max_num_seqs, 64))),
            prompt_seq=make_buckets(env("KILN_PROMPT_SEQ_BUCKET_MIN", block_size),
                                    env("KILN_PROMPT_SEQ_BUCKET_STEP", max(block_size, 256)),
                                    env("KILN_PROMPT_SEQ_BUCKET_MAX", max_prompt)),
            decode_bs=make_buckets(env("KILN_DECODE_BS_BUCKET_MIN", 1), env("KILN_DECODE_BS_BUCKET_STEP", 32),
                                   env("KILN_DECODE_BS_BUCKET_MAX", max_num_seqs)),
            decode_blocks=make_buckets(env("KILN_DECODE_BLOCK_BUCKET_MIN", min(4, blocks)),
                                       env("KILN_DECODE_BLOCK_BUCKET_STEP", 32),
                                       env("KILN_DECODE_BLOCK_BUCKET_MAX", blocks)),
            max_prompt_tokens=sc.max_num_batched_tokens)
        if plan.prompt_seq[-1] < 1 or plan.decode_blocks[-1] * block_size < max_len:
            raise ValueError("decode block buckets must cover max_model_len")
        return cls(model=mc, cache=cc, scheduler=sc, buckets=plan, dtype=resolved, seed=seed)
