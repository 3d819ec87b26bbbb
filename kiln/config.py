"""kiln's configuration: frozen, validated dataclasses, and `Env`, the one reading of the environment.

This module is a leaf: it imports nothing else of kiln. Derivation that needs the model, the device or I/O
(free memory, bucket ranges, backend resolution, KV bytes per block) lives in `kiln.engine.build`, which
turns user options into an `EngineConfig`:

    Env.read()  (KILN_* / VLLM_* / XLA_FLAGS, once per build)  ─┐
    LLM(...) kwargs / CLI flags                                   ├─> engine/build.build_config ─> EngineConfig
    ModelSpec, free memory, runner class                          ─┘

`BucketPlan` and `MemoryPlan` are plain data the config holds; compile/buckets and compile/planner keep the
functions that make them.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
from collections.abc import Mapping
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16")
QUANTIZATIONS = ("auto", "exact", "blocks", "none")
PREFILL_STRATEGIES = ("min_tokens", "max_bs")
DECODE_STRATEGIES = ("max_bs", "min_tokens")
BUCKET_DIMS = ("PROMPT_BS", "PROMPT_SEQ", "DECODE_BS", "DECODE_BLOCK")


def _truthy(v: str | None) -> bool | None:
    return None if v is None or v == "" else v.lower() in ("1", "true", "yes")


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` set (non-empty) in the environment: kiln's spelling first, then vLLM's."""
    return next((environ[n] for n in names if environ.get(n)), None)


@dataclasses.dataclass(frozen=True)
class Env:
    """Every environment variable kiln reads, read in one place (`Env.read`). Fields are None when unset."""
    cache_dir: Path = Path("~/.cache/kiln").expanduser()      # KILN_CACHE_DIR: models, graphs, kernels
    models_dir: Path | None = None                            # KILN_MODELS_DIR (default cache_dir/models)
    backend: str | None = None                                # KILN_BACKEND
    skip_warmup: bool | None = None                           # KILN_SKIP_WARMUP | VLLM_SKIP_WARMUP
    kv_cache_gib: float | None = None                         # KILN_KVCACHE_SPACE | VLLM_CPU_KVCACHE_SPACE
    buckets: Mapping[str, tuple[int | None, int | None, int | None]] = dataclasses.field(default_factory=dict)
    xla_flags: str = ""                                       # XLA_FLAGS: they change compiled graphs
    coordinator_address: str | None = None                    # KILN_COORDINATOR_ADDRESS | JAX_COORDINATOR_ADDRESS
    num_processes: int | None = None                          # KILN_NUM_PROCESSES | JAX_NUM_PROCESSES
    process_id: int | None = None                             # KILN_PROCESS_ID | JAX_PROCESS_ID
    ray_address: str | None = None                            # KILN_RAY_ADDRESS | RAY_ADDRESS

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Env:
        """Snapshot `environ` (default os.environ). KILN_<DIM>_BUCKET_{MIN,STEP,MAX} or the VLLM_ spelling
        set one bucket dimension's range (DIM: PROMPT_BS, PROMPT_SEQ, DECODE_BS, DECODE_BLOCK)."""
        e = os.environ if environ is None else environ
        cache = Path(e.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln").expanduser()
        buckets = {}
        for dim in BUCKET_DIMS:
            parts = tuple(_first(e, f"KILN_{dim}_BUCKET_{p}", f"VLLM_{dim}_BUCKET_{p}") for p in ("MIN", "STEP", "MAX"))
            if any(parts):
                buckets[dim] = tuple(int(p) if p else None for p in parts)
        space = _first(e, "KILN_KVCACHE_SPACE", "VLLM_CPU_KVCACHE_SPACE")
        nproc, pid = _first(e, "KILN_NUM_PROCESSES", "JAX_NUM_PROCESSES"), _first(e, "KILN_PROCESS_ID", "JAX_PROCESS_ID")
        return cls(cache_dir=cache,
                   models_dir=Path(e["KILN_MODELS_DIR"]).expanduser() if e.get("KILN_MODELS_DIR") else None,
                   backend=e.get("KILN_BACKEND") or None,
                   skip_warmup=_truthy(_first(e, "KILN_SKIP_WARMUP", "VLLM_SKIP_WARMUP")),
                   kv_cache_gib=float(space) if space else None, buckets=buckets, xla_flags=e.get("XLA_FLAGS", ""),
                   coordinator_address=_first(e, "KILN_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
                   num_processes=int(nproc) if nproc else None, process_id=int(pid) if pid else None,
                   ray_address=_first(e, "KILN_RAY_ADDRESS", "RAY_ADDRESS"))

    @property
    def models(self) -> Path:
        return self.models_dir or self.cache_dir / "models"


def cache_dir() -> Path:
    """Root of kiln's on-disk state (models, graph cache, kernels): $KILN_CACHE_DIR or ~/.cache/kiln."""
    return Env.read().cache_dir


def models_dir() -> Path:
    return Env.read().models


def xla_flags() -> str:
    """XLA_FLAGS as the process sees them now."""
    return Env.read().xla_flags


def resolve_dtype(dtype: str, platform: str, backend: str = "jax") -> str:
    """auto: float32 for XLA on CPU (XLA:CPU runs f32 dots faster than bf16), else bfloat16 (accelerators, and
    PyTorch on CPU, whose oneDNN bf16 dots are the fast ones)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype if dtype != "auto" else ("float32" if platform == "cpu" and backend == "jax" else "bfloat16")


# -- plain data the config holds --------------------------------------------------------------------------
def pick(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"size {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Prefill graphs over (batch, seq_len) and decode graphs over (batch, num_blocks) (compile/buckets)."""
    prompt_bs: tuple[int, ...]
    prompt_seq: tuple[int, ...]
    decode_bs: tuple[int, ...]
    decode_blocks: tuple[int, ...]
    max_prompt_tokens: int          # a prefill bucket's batch x seq_len never exceeds this

    def prefill_buckets(self) -> list[tuple[int, int]]:
        """Every (batch, seq_len) whose padded tokens fit the step budget."""
        return [(b, s) for b, s in itertools.product(self.prompt_bs, self.prompt_seq)
                if b * s <= self.max_prompt_tokens]

    def max_prefill_seq(self, batch: int) -> int:
        """The longest seq_len bucket a prefill of `batch` rows may use (0: none fits the budget)."""
        b = pick(self.prompt_bs, batch)
        return max((s for s in self.prompt_seq if b * s <= self.max_prompt_tokens), default=0)

    def required_buckets(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The graphs that hold every admissible step: for each prefill batch size its longest seq_len
        within the budget, and the largest decode bucket."""
        prefill = [(b, self.max_prefill_seq(b)) for b in self.prompt_bs if self.max_prefill_seq(b)]
        return prefill, [(self.decode_bs[-1], self.decode_blocks[-1])]

    def decode_buckets(self) -> list[tuple[int, int]]:
        return list(itertools.product(self.decode_bs, self.decode_blocks))

    def prefill_bucket(self, batch: int, seq_len: int) -> tuple[int, int]:
        return pick(self.prompt_bs, batch), pick(self.prompt_seq, seq_len)

    def decode_bucket(self, batch: int, num_blocks: int) -> tuple[int, int]:
        return pick(self.decode_bs, batch), pick(self.decode_blocks, num_blocks)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How usable memory is split between compiled graphs and the KV cache (compile/planner.plan_memory)."""
    free_bytes: int
    usable_bytes: int
    prompt_graph_bytes: int
    decode_graph_bytes: int
    kv_bytes: int                        # per device (a tensor-parallel mesh: on each of its devices)
    num_blocks: int
    kv_bytes_per_block: int = 0          # K and V of one block on one device (1/tp of it when sharded by KV head)
    kv_shards: int = 1                   # devices the KV heads are split over (1: whole on every device)


# -- the configuration ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"                  # auto: float32 for XLA on CPU (its f32 dots are fastest), else bfloat16
    backend: str = "auto"                # auto | jax | torch (backends/platform.resolve_backend)
    quantization: str = "auto"           # auto: torch keeps GGUF legacy-quant blocks exactly (small steps),
    #                                        int8 activations in bfloat16, float32 ones in float32 | exact: float32
    #                                        activations | blocks: no dense copies, int8 activations | none

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
    max_num_batched_tokens: int = 2048   # tokens per step: the decodes (1 each), then prefill chunks (their
                                         # padded bucket within it)
    max_model_len: int = 2048            # prompt + output tokens of one request
    long_prefill_token_threshold: int = 0  # a prompt's chunk per step is at most this many tokens (0: off)

    def __post_init__(self):
        for f in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be at least 1, got {getattr(self, f)}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be 0 (off) or positive, got "
                             f"{self.long_prefill_token_threshold}")


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
    warmup_scoring: bool = False         # warmup also builds a score graph per prefill graph (prompt logprobs,
                                         # echo and embeddings on an engine that forbids compiles after warmup)
    tune_matmul_dtypes: bool = False     # jax, --dtype auto: each bucket's matmuls in the dtype a probe measured
                                         # faster on this machine (stored with the graph cache); else float32

    def __post_init__(self):
        if self.prefill_strategy not in PREFILL_STRATEGIES:
            raise ValueError(f"prefill_strategy must be one of {PREFILL_STRATEGIES}, got {self.prefill_strategy!r}")
        if self.decode_strategy not in DECODE_STRATEGIES:
            raise ValueError(f"decode_strategy must be one of {DECODE_STRATEGIES}, got {self.decode_strategy!r}")
        for f in ("memory_utilization", "graph_reserved_fraction", "graph_prompt_ratio"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ValueError(f"{f} must be in [0, 1], got {getattr(self, f)}")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (engine/speculative.py): vLLM's `speculative_config` keys. method None: off."""
    method: str | None = None            # None | "ngram" (prompt lookup: engine/ngram.py)
    num_speculative_tokens: int = 0      # drafts verified per step at most (K)
    prompt_lookup_max: int = 4           # longest n-gram of the context's end matched against earlier context
    prompt_lookup_min: int = 2           # shortest one tried

    def __post_init__(self):
        if self.method not in (None, "ngram"):
            raise ValueError(f"speculative method must be 'ngram' (the one kiln has), got {self.method!r}")
        if self.method is not None and self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} "
                             f"and {self.prompt_lookup_max}")

    @property
    def enabled(self) -> bool:
        return self.method is not None


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How one engine spans devices and processes (backends/jax/mesh.py, distributed/)."""
    tensor_parallel_size: int = 1        # devices one model copy is split over (jax backend), Megatron layout
    coordinator_address: str | None = None   # host:port of process 0's jax.distributed coordinator (multi-host)
    num_processes: int = 1               # processes of one engine (multi-host); each runs the same step loop
    process_id: int = 0                  # this process; 0 schedules and serves, the others follow its steps

    def __post_init__(self):
        if self.tensor_parallel_size < 1 or self.num_processes < 1:
            raise ValueError("tensor_parallel_size and num_processes must be at least 1")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes}), got {self.process_id}")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError("num_processes > 1 needs a coordinator address (--coordinator-address host:port "
                             "or KILN_COORDINATOR_ADDRESS / JAX_COORDINATOR_ADDRESS)")

    @classmethod
    def of(cls, env: Env, *, tensor_parallel_size: int = 1, coordinator_address: str | None = None,
           num_processes: int | None = None, process_id: int | None = None) -> ParallelConfig:
        """Flags first, then the environment (KILN_* or JAX_* spellings)."""
        pick_ = lambda flag, envv, default: flag if flag is not None else envv if envv is not None else default
        return cls(tensor_parallel_size=tensor_parallel_size,
                   coordinator_address=coordinator_address or env.coordinator_address,
                   num_processes=pick_(num_processes, env.num_processes, 1),
                   process_id=pick_(process_id, env.process_id, 0))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from, resolved (engine/build.build_config makes one)."""
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    buckets: BucketPlan
    compile: CompileConfig
    memory: MemoryPlan
    dtype: str                           # resolved: float32 or bfloat16
    backend: str = "jax"                 # resolved: jax, torch (or mock, in tests)
    kv_dtype: str = "float32"            # resolved KV-cache dtype (kv_cache_dtype auto: the compute dtype)
    platform: str = "cpu"
    seed: int = 0
    env: Env = dataclasses.field(default_factory=Env)   # the environment snapshot this config was built with
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = dataclasses.field(default_factory=SpeculativeConfig)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.scheduler.max_model_len // self.cache.block_size)

    @property
    def graph_cache_dir(self) -> Path:
        return self.env.cache_dir / "graphs"
