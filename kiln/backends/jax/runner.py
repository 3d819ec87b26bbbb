"""The JAX runner: a SchedulerOutput in, sampled tokens out, one compiled call and one host sync per step.

    SchedulerOutput ──> pad to the smallest bucket (compile/buckets) ──> numpy arrays
                    ──> the executable compiled for (kind, batch, seq_len | num_blocks, logprobs)
                    ──> (K/V cache updated in place: donated) + SampleOutput ──> StepResult

Executables are built with `jit(...).lower(...).compile()` for exact static shapes and kept by bucket, so
the same bucket never compiles twice; `compile/` decides which buckets exist and when they are built.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kiln.backends.jax import model as M
from kiln.config import EngineConfig
from kiln.engine.sampling_params import MAX_LOGPROBS
from kiln.engine.scheduler_output import SchedulerOutput
from kiln.kernels.sampling import SampleOutput, SamplingTensors, build_sampling_tensors, sample
from kiln.models.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepResult:
    tokens: list[int]                          # one per row of the SchedulerOutput (ignore rows with sample=False)
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None  # per row top-N (token, logprob), when some row asked


@dataclasses.dataclass(frozen=True)
class GraphKey:
    kind: str          # prefill | decode
    batch: int
    size: int          # prefill: seq_len bucket; decode: num_blocks bucket
    num_logprobs: int  # 0 or MAX_LOGPROBS (static top-k width)


def _prefill_step(spec: ModelSpec, scale: float, num_logprobs: int, params, k_cache, v_cache, tokens,
                  positions, slots, block_tables, prefix_lens, q_lens, st: SamplingTensors):
    attend = M.attend_fn(block_tables, prefix_lens, q_lens, scale, decode=False)
    h, k_cache, v_cache = M.forward(spec, params, k_cache, v_cache, tokens, positions, slots, attend)
    last = jnp.take_along_axis(h, jnp.maximum(q_lens - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
    return k_cache, v_cache, sample(M.lm_head(params, last), st, num_logprobs=num_logprobs)


def _decode_step(spec: ModelSpec, scale: float, num_logprobs: int, params, k_cache, v_cache, tokens,
                 positions, slots, block_tables, context_lens, st: SamplingTensors):
    attend = M.attend_fn(block_tables, context_lens, jnp.ones_like(context_lens), scale, decode=True)
    h, k_cache, v_cache = M.forward(spec, params, k_cache, v_cache, tokens, positions, slots, attend)
    return k_cache, v_cache, sample(M.lm_head(params, h[:, 0]), st, num_logprobs=num_logprobs)


class JaxRunner:
    """Owns the weights, the paged KV cache and the compiled step executables of one device."""

    def __init__(self, spec: ModelSpec, params: M.Params, config: EngineConfig):
        self.spec, self.params, self.config = spec, params, config
        cc = config.cache
        shape = (spec.num_layers, cc.num_blocks, cc.block_size, spec.num_kv_heads, spec.head_dim)
        dtype = jnp.dtype(config.dtype)
        self.k_cache = jnp.zeros(shape, dtype)                     # [L, NB, bs, KVH, Dh]
        self.v_cache = jnp.zeros(shape, dtype)
        self.executables: dict[GraphKey, jax.stages.Compiled] = {}
        self.compile_log: list[tuple[GraphKey, float]] = []        # every compile, with its seconds
        self.padding_tokens = 0                                    # bucket waste, for metrics
        self.real_tokens = 0
        log.info("KV cache: %d blocks x %d tokens (%.2f GiB)", cc.num_blocks, cc.block_size,
                 2 * self.k_cache.nbytes / 2**30)

    # -- graphs -----------------------------------------------------------------------------------
    def _abstract_args(self, key: GraphKey):
        B, bs = key.batch, self.config.cache.block_size
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
        if key.kind == "prefill":
            T, nbt = key.size, self.config.max_blocks_per_seq
            batch = (i32(B, T), i32(B, T), i32(B, T), i32(B, nbt), i32(B), i32(B))
        else:
            T, nbt = 1, key.size
            batch = (i32(B, 1), i32(B, 1), i32(B, 1), i32(B, nbt), i32(B))
        st = build_sampling_tensors([], [], [], [], [], [], B, nbt * bs)
        st = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), st)
        spec_of = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        return (jax.tree.map(spec_of, self.params), spec_of(self.k_cache), spec_of(self.v_cache), *batch, st)

    def lower(self, key: GraphKey):
        fn = _prefill_step if key.kind == "prefill" else _decode_step
        step = partial(fn, self.spec, self.spec.head_dim ** -0.5, key.num_logprobs)
        return jax.jit(step, donate_argnums=(1, 2)).lower(*self._abstract_args(key))

    def compile(self, key: GraphKey) -> jax.stages.Compiled:
        if key not in self.executables:
            t0 = time.perf_counter()
            self.executables[key] = self.lower(key).compile()
            dt = time.perf_counter() - t0
            self.compile_log.append((key, dt))
            log.info("compiled %s in %.2fs", key, dt)
        return self.executables[key]

    # -- one step ---------------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> StepResult:
        rows, plan, bs = out.rows, self.config.buckets, self.config.cache.block_size
        want_lp = max((r.sampling_params.logprobs or 0) + 1 for r in rows) if any(
            r.sampling_params.logprobs is not None for r in rows) else 0
        if out.kind == "prefill":
            B, T = plan.prefill_bucket(len(rows), max(len(r.token_ids) for r in rows))
            nbt = self.config.max_blocks_per_seq
        else:
            B, nbt = plan.decode_bucket(len(rows), max(len(r.block_table) for r in rows))
            T = 1
        key = GraphKey(out.kind, B, T if out.kind == "prefill" else nbt, MAX_LOGPROBS if want_lp else 0)
        exe = self.compile(key)

        tokens = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        slots = np.zeros((B, T), np.int32)                          # padding writes land in null block 0
        tables = np.zeros((B, nbt), np.int32)
        starts = np.zeros(B, np.int32)
        lens = np.zeros(B, np.int32)
        for i, r in enumerate(rows):
            n = len(r.token_ids)
            pos = np.arange(r.start_pos, r.start_pos + n)
            table = np.asarray(r.block_table, np.int32)
            tokens[i, :n] = r.token_ids
            positions[i, :n] = pos
            slots[i, :n] = table[pos // bs] * bs + pos % bs
            tables[i, :len(table)] = table
            starts[i], lens[i] = r.start_pos, n
        self.real_tokens += out.num_tokens
        self.padding_tokens += B * T - out.num_tokens
        st = build_sampling_tensors([r.sampling_params for r in rows], [r.history for r in rows],
                                    [r.prompt_len for r in rows], rows[0].eos_token_ids,
                                    [r.output_index for r in rows], [r.seed for r in rows], B, nbt * bs)
        if out.kind == "prefill":
            batch = (tokens, positions, slots, tables, starts, lens)
        else:
            batch = (tokens, positions, slots, tables, starts)
        self.k_cache, self.v_cache, res = exe(self.params, self.k_cache, self.v_cache, *batch, st)
        res: SampleOutput = jax.device_get(res)                     # the step's one host sync
        n = len(rows)
        top = None
        if want_lp:
            top = [list(zip(res.top_ids[i, :want_lp].tolist(), res.top_logprobs[i, :want_lp].tolist()))
                   for i in range(n)]
        return StepResult(res.tokens[:n].tolist(), res.logprobs[:n].tolist(), top)
