"""Building an engine: derive the configuration (with I/O), then construct the runner and the engine.

    build_engine(model, **options)
      ├─ Env.read()                          the environment, once (config.Env)
      ├─ models/loader.load_model            spec, host tensors, tokenizer
      ├─ build_config(spec, **options)       backend (backends/platform), dtype, max_model_len, KV bytes per
      │                                      block (from the runner class; per device: 1/tp when the KV
      │                                      cache splits by KV head), free memory -> memory plan
      │                                      (compile/planner), bucket ranges (flags > env > defaults)
      ├─ backends/registry.create_runner     weights and KV cache on the device
      ├─ runner.warmup()                     unless warmup=False: nothing compiles while serving
      └─ LLMEngine(config, spec, runner, tokenizer)

Options are the `LLM(...)` keyword arguments and CLI flags; unknown ones raise TypeError (from CompileConfig).
"""
from __future__ import annotations

import logging

from kiln.backends.platform import resolve_backend
from kiln.backends.registry import create_runner, runner_class
from kiln.compile.buckets import make_buckets
from kiln.compile.planner import host_free_bytes, kv_block_bytes_per_device, plan_memory
from kiln.config import (DTYPES, BucketPlan, CacheConfig, CompileConfig, EngineConfig, Env, ModelConfig,
                         ParallelConfig, SchedulerConfig, resolve_dtype)
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.speculative import speculative_config as speculative_config_of
from kiln.models.spec import ModelSpec

log = logging.getLogger(__name__)

SPECULATIVE_BACKENDS = ("torch", "mock")
"""Backends that run verify steps (speculative decoding): eager ones, where a decode row of 1 + K tokens is no
new graph."""

TORCH_TP = ("--backend {backend} has no tensor parallelism: on a CPU it does not pay. Measured on this 2-core "
            "machine (scripts/torch_tp_cpu.py, a decode step of the default model's shape, float32): 2 gloo "
            "processes x 1 thread took 0.45x / 0.63x / 0.97x the speed of the best single process at batch 1 / 8 "
            "/ 32, since every step needs 60 all-reduces (2 a layer) of ~1-4 ms each over loopback, as long as "
            "the matmuls they split. Use --backend jax --tensor-parallel-size N (devices), or "
            "--data-parallel-size N (replicas of any backend)")


def bucket_range(given: tuple[int | None, ...] | None, env: tuple[int | None, ...] | None,
                 default: tuple[int, int, int]) -> tuple[int, int, int]:
    """(min, step, max) of one bucket dimension, part by part: a flag value wins, then the environment
    (KILN_<DIM>_BUCKET_* or VLLM_<DIM>_BUCKET_*), then the default derived from the engine limits."""
    return tuple(int(next(v for v in ((given or (None,) * 3)[i], (env or (None,) * 3)[i], default[i])
                          if v is not None)) for i in range(3))


def make_plan(*, buckets: dict, env: Env, block_size: int, max_num_seqs: int, max_model_len: int,
              max_num_batched_tokens: int) -> BucketPlan:
    """The bucket plan of these limits, checked to hold every admissible step."""
    blocks = -(-max_model_len // block_size)
    max_prompt = min(max_num_batched_tokens, max_model_len)
    dims = {"prompt_bs": ("PROMPT_BS", (1, 32, min(max_num_seqs, 64))),
            "prompt_seq": ("PROMPT_SEQ", (block_size, max(block_size, 256), max_prompt)),
            "decode_bs": ("DECODE_BS", (1, 32, max_num_seqs)),
            "decode_blocks": ("DECODE_BLOCK", (min(4, blocks), 32, blocks))}
    plan = BucketPlan(**{k: make_buckets(*bucket_range(buckets.get(k), env.buckets.get(name), default))
                         for k, (name, default) in dims.items()}, max_prompt_tokens=max_num_batched_tokens)
    if plan.decode_blocks[-1] < blocks:
        raise ValueError(f"the largest decode block bucket ({plan.decode_blocks[-1]}) must cover max_model_len="
                         f"{max_model_len} ({blocks} blocks of {block_size})")
    if plan.prompt_seq[-1] > max_prompt or not plan.required_buckets()[0]:
        raise ValueError(f"prompt seq_len buckets (max {plan.prompt_seq[-1]}) must fit max_num_batched_tokens="
                         f"{max_num_batched_tokens} and max_model_len={max_model_len}")
    return plan


def resolve_max_len(spec: ModelSpec, max_model_len: int | None) -> int:
    """max_model_len, or the model's limit capped at 2048. Sliding-window layers attend over their window
    only (both backends), so the context may exceed the window."""
    max_len = max_model_len or min(spec.max_position_embeddings, 2048)
    if max_len > spec.max_position_embeddings:
        raise ValueError(f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                         f"{spec.max_position_embeddings}")
    return max_len


def build_config(spec: ModelSpec, *, model: str = ModelConfig.model, dtype: str = "auto", backend: str | None = None,
                 quantization: str = "auto", kv_cache_dtype: str = "auto", block_size: int = 16,
                 num_blocks: int = 0, kv_cache_gib: float | None = None, enable_prefix_caching: bool = True,
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None,
                 max_model_len: int | None = None, long_prefill_token_threshold: int = 0, seed: int = 0, platform: str | None = None,
                 free_bytes: int | None = None, buckets: dict[str, tuple[int, int, int]] | None = None,
                 env: Env | None = None, tensor_parallel_size: int | None = None,
                 parallel: ParallelConfig | None = None, speculative_config=None, **compile_kwargs) -> EngineConfig:
    """The EngineConfig of these options for a model of `spec`. platform None: JAX's default device;
    free_bytes None: the host's available memory; env None: Env.read(). `buckets` maps prompt_bs,
    prompt_seq, decode_bs, decode_blocks to (min, step, max), any part None; compile_kwargs are
    CompileConfig's (warmup None: not KILN_SKIP_WARMUP). `speculative_config` is vLLM's dict ({"method": "ngram",
    "num_speculative_tokens": K, ...}, engine/speculative) or a SpeculativeConfig."""
    env = env or Env.read()
    if platform is None:
        from kiln.backends.platform import jax_platform
        platform = jax_platform()
    backend = backend or env.backend or "auto"
    mc = ModelConfig(model=model, dtype=dtype, backend=backend, quantization=quantization)
    parallel = parallel or ParallelConfig.of(env, tensor_parallel_size=tensor_parallel_size or 1)
    spans = parallel.tensor_parallel_size > 1 or parallel.num_processes > 1
    backend = resolve_backend("jax" if backend == "auto" and spans else backend, platform)   # auto: TP is jax's
    if backend != "jax" and spans:
        raise ValueError(TORCH_TP.format(backend=backend) if backend == "torch" else
                         f"tensor parallelism and multi-host run on the jax backend; backend is {backend} "
                         f"(use --backend jax, or --data-parallel-size for replicas of any backend)")
    spec_config = speculative_config_of(speculative_config)
    if spec_config.enabled and backend not in SPECULATIVE_BACKENDS:
        raise ValueError(f"speculative decoding ({spec_config.method}) runs on the torch backend; backend {backend} "
                         f"has no verify step (decode rows of 1 + num_speculative_tokens tokens are a graph "
                         f"family the jax backend does not compile): use --backend torch")
    resolved = resolve_dtype(dtype, platform, backend)
    max_len = resolve_max_len(spec, max_model_len)
    sc = SchedulerConfig(max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens or max(2048, min(max_len, 8192)),
                         max_model_len=max_len, long_prefill_token_threshold=long_prefill_token_threshold)
    if compile_kwargs.get("warmup") is None:
        compile_kwargs["warmup"] = not env.skip_warmup
    comp = CompileConfig(**compile_kwargs)
    if kv_cache_gib is None:   # CPU: a fixed KV budget, as vLLM CPU's VLLM_CPU_KVCACHE_SPACE; else split free memory
        kv_cache_gib = env.kv_cache_gib if env.kv_cache_gib is not None else (1.0 if platform == "cpu" else None)
    if kv_cache_dtype not in DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(DTYPES)}, got {kv_cache_dtype!r}")
    if kv_cache_dtype != "auto" and backend == "jax" and kv_cache_dtype != resolved:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype} needs backend torch; jax keeps the cache in dtype "
                         f"{resolved}")
    kv_dtype = resolved if kv_cache_dtype == "auto" else kv_cache_dtype
    whole = runner_class(backend).kv_bytes_per_block(spec=spec, block_size=block_size, kv_dtype=kv_dtype)
    per_block, shards = kv_block_bytes_per_device(whole, num_kv_heads=spec.num_kv_heads,
                                                  tp=parallel.tensor_parallel_size)
    kv_bytes = num_blocks * per_block if num_blocks else None if kv_cache_gib is None else int(kv_cache_gib * 2**30)
    memory = plan_memory(free_bytes=_device_free_bytes(free_bytes, platform, parallel),
                         memory_utilization=comp.memory_utilization,
                         graph_reserved_fraction=comp.graph_reserved_fraction,
                         graph_prompt_ratio=comp.graph_prompt_ratio, bytes_per_block=per_block,
                         block_size=block_size, max_model_len=max_len, kv_bytes=kv_bytes, kv_shards=shards)
    _log_kv(memory, parallel.tensor_parallel_size, spec.num_kv_heads, num_blocks or memory.num_blocks)
    cc = CacheConfig(block_size=block_size, num_blocks=num_blocks or memory.num_blocks,
                     kv_cache_gib=memory.kv_bytes / 2**30, enable_prefix_caching=enable_prefix_caching)
    plan = make_plan(buckets=buckets or {}, env=env, block_size=block_size, max_num_seqs=max_num_seqs,
                     max_model_len=max_len, max_num_batched_tokens=sc.max_num_batched_tokens)
    return EngineConfig(model=mc, cache=cc, scheduler=sc, buckets=plan, compile=comp, memory=memory,
                        dtype=resolved, backend=backend, kv_dtype=kv_dtype, platform=platform, seed=seed, env=env,
                        parallel=parallel, speculative=spec_config)


def _device_free_bytes(free_bytes: int | None, platform: str, parallel: ParallelConfig) -> int:
    """Free memory of one device of the mesh: given, or the host's; forced CPU devices share one host's memory,
    so each of this process's gets its part (--kv-cache-gib is per device, as vLLM's per-worker budgets)."""
    free = host_free_bytes() if free_bytes is None else free_bytes
    local = max(parallel.tensor_parallel_size // parallel.num_processes, 1) if platform == "cpu" else 1
    return free // local


def _log_kv(memory, tp: int, kv_heads: int, num_blocks: int) -> None:
    if tp == 1:
        return
    how = (f"split by KV head: {kv_heads // tp} of {kv_heads} KV heads per device" if memory.kv_shards > 1 else
           f"replicated: {kv_heads} KV heads do not split over {tp} devices (GQA), every device holds all")
    log.info("KV cache over %d devices, %s; %d blocks per device, %d bytes per block per device (%.2f GiB)", tp,
             how, num_blocks, memory.kv_bytes_per_block, num_blocks * memory.kv_bytes_per_block / 2**30)


def _parallel(env: Env, kwargs: dict) -> ParallelConfig:
    """The ParallelConfig of these options (popped from kwargs) and the environment."""
    names = ("tensor_parallel_size", "coordinator_address", "num_processes", "process_id")
    given = {k: kwargs.pop(k) for k in names if kwargs.get(k) is not None}
    return kwargs.pop("parallel", None) or ParallelConfig.of(env, **given)


def build_runner(model: str = ModelConfig.model, **kwargs):
    """Load the model, derive the config, build the runner and warm it up: (config, loaded, runner). A
    multi-process engine starts jax.distributed first (kiln.distributed.init), before JAX sees a device."""
    from kiln.distributed.init import initialize
    from kiln.models.loader import load_model
    env = kwargs.pop("env", None) or Env.read()
    parallel = _parallel(env, kwargs)
    initialize(parallel)
    loaded = load_model(model, env.models)
    config = build_config(loaded.spec, model=model, env=env, parallel=parallel, **kwargs)
    log.info("backend %s, %s", config.backend, config.dtype)
    runner = create_runner(config.backend, spec=loaded.spec, config=config, tensors=loaded.tensors)
    del loaded.tensors
    if config.compile.warmup:
        runner.warmup()
    return config, loaded, runner


def build_engine(model: str = ModelConfig.model, **kwargs) -> LLMEngine:
    """Load weights and tokenizer, derive the config, build the runner, warm it up, build the engine.
    Keyword arguments are build_config's. In a multi-process engine this is process 0's: its runner
    broadcasts every step to the followers (kiln.distributed.lockstep; they run `run_follower`)."""
    config, loaded, runner = build_runner(model, **kwargs)
    if config.parallel.num_processes > 1:
        from kiln.distributed.lockstep import LockstepRunner
        if config.parallel.process_id != 0:
            raise ValueError(f"process {config.parallel.process_id} of a multi-process engine follows process "
                             f"0's steps (kiln.distributed.lockstep.run_follower), it builds no engine")
        runner = LockstepRunner(runner)
    return LLMEngine(config, loaded.spec, runner, loaded.tokenizer)
