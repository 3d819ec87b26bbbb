"""The JAX runner: a SchedulerOutput in, sampled tokens out, one compiled call and one host sync per step.

    SchedulerOutput ──> the smallest planned bucket holding it (compile/buckets)
                    ──> backends/inputs.prepare_step, padded to that bucket ──> numpy arrays
                    ──> the executable compiled for GraphKey(kind, batch, seq_len | num_blocks)
                    ──> (K/V cache updated in place: donated) + logits [B, V] on device
                    ──> the sampler graph of batch B (plain greedy or general, kernels/sampling) ──> StepResult

Executables are built with `jit(...).lower(...).compile()` for exact static shapes and kept by GraphKey, so the
same bucket never compiles twice; `warmup()` builds the planned ones (compile/warmup.build_graphs), from the
persistent graph cache where it can, then arms the no-compile guard.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from kiln.backends import inputs as I
from kiln.backends.base import ModelRunner, RunnerStats, StepResult
from kiln.backends.jax import model as M
from kiln.backends.jax import steps as S
from kiln.backends.jax import tuning as T
from kiln.backends.jax.mesh import Placement
from kiln.compile.graph_cache import GRAPH_VERSION, GraphCache, fingerprint_key
from kiln.compile.graph_key import GraphKey
from kiln.compile.guard import CompileGuard
from kiln.compile.warmup import WarmupReport, build_graphs
from kiln.config import EngineConfig
from kiln.engine.scheduler_output import SchedulerOutput
from kiln.kernels.sampling import SampleOutput
from kiln.models.spec import ModelSpec

log = logging.getLogger(__name__)


class JaxRunner(ModelRunner):
    """Owns the weights, the paged KV cache and the compiled step executables of one device."""

    name = "jax"
    compiled_kinds = ("prefill", "decode", "sample", "score")      # the graph families warmup builds
                                                                   # (score: with --warmup-scoring only)

    # the plain-greedy sampler inside the prefill/decode graph (one executable per greedy step; the logits still
    # come out for any other sampler): the step's measured choice, BENCHMARKS.md (scripts/bench_fused_sampler.py)
    fused_greedy = True
    # XLA:CPU debug options every graph is compiled with (in the graph-cache key): none measured a gain on this
    # jaxlib (BENCHMARKS.md, scripts/bench_jax_step.py); kept as the one place to set them
    compiler_options: dict = {}

    def __init__(self, *, spec: ModelSpec, config: EngineConfig, tensors):
        self._setup(spec, config, M.params_from_hf(spec, tensors, jnp.dtype(config.dtype)))

    def _setup(self, spec: ModelSpec, config: EngineConfig, params) -> None:
        par = config.parallel                                       # the mesh and shardings: backends/jax/mesh.py
        self.placement = Placement.for_model(spec, params, par.tensor_parallel_size,
                                             multi_process=par.num_processes > 1)
        self.spec, self.params, self.config = spec, self.placement.params(params), config
        cc = config.cache
        shape = (spec.num_layers, cc.num_blocks, spec.num_kv_heads, cc.block_size, spec.head_dim)
        self.k_cache = self.placement.kv_zeros(shape, jnp.dtype(config.dtype))   # [L, NB, KVH, bs, Dh]
        self.v_cache = self.placement.kv_zeros(shape, jnp.dtype(config.dtype))
        self.executables: dict[GraphKey, jax.stages.Compiled] = {}
        self.compile_log: list[tuple[GraphKey, float]] = []        # every compile, with its seconds
        self.graph_memory: dict[GraphKey, int] = {}                # bytes of temporaries + code per graph
        self.history_len = config.max_blocks_per_seq * cc.block_size   # token history width for penalties
        self.guard = CompileGuard(allow_lazy=config.compile.allow_lazy_compile or not config.compile.warmup)
        self.cache = GraphCache(config.graph_cache_dir) if config.compile.graph_cache else None
        self._stats = RunnerStats()
        # --tune-matmul-dtypes with --dtype auto: float32 params and residual stream, each bucket's matmuls in the
        # dtype measured faster (off by default: a probe's answer varies with the machine's load)
        measured = config.compile.tune_matmul_dtypes and config.model.dtype == "auto" and config.dtype == "float32"
        self.tuning = T.load_or_probe(spec, config.graph_cache_dir if self.cache else None) if measured \
            else T.StepTuning()
        self.params_bf16 = None      # matmul weights in bf16 for the buckets that chose it (placed like params)
        if self.tuning.uses_bf16:
            self.params_bf16 = self.placement.params(T.bf16_params(params, tied_head=self.placement.mesh is None))
        log.info("KV cache: %d blocks x %d tokens (%.2f GiB)", cc.num_blocks, cc.block_size,
                 2 * self.k_cache.nbytes / 2**30)

    # -- the contract -----------------------------------------------------------------------------
    def warmup(self, *, check_only: bool = False, show_progress: bool = True) -> WarmupReport:
        return build_graphs(self, check_only=check_only, show_progress=show_progress)

    def stats(self) -> RunnerStats:
        st = self._stats
        return dataclasses.replace(st, padding_by_bucket=dict(st.padding_by_bucket), compiles=len(self.compile_log),
                                   compiles_while_serving=self.guard.while_serving,
                                   graph_cache_hits=self.cache.hits if self.cache else 0)

    def close(self) -> None:
        self.guard.close()

    # -- graphs -----------------------------------------------------------------------------------
    def matmul_dtype(self, key: GraphKey) -> str:
        """The matmul dtype of `key`'s graph: by the rows it computes (tuning.py); samplers have none."""
        if key.kind == "sample":
            return "float32"
        return self.tuning.matmul_dtype(key.batch * (1 if key.kind == "decode" else key.size))

    def params_for(self, key: GraphKey):
        return self.params_bf16 if self.matmul_dtype(key) == "bfloat16" else self.params

    def _abstract_args(self, key: GraphKey):
        B, pl = key.batch, self.placement
        i32 = lambda *s: pl.abstract(jax.ShapeDtypeStruct(s, jnp.int32))
        flag = pl.abstract(jax.ShapeDtypeStruct((), jnp.bool_))
        if key.kind == "sample":
            logits = pl.abstract(jax.ShapeDtypeStruct((B, self.spec.vocab_size), jnp.float32))
            if not key.size:
                return logits, flag
            st = I.build_sampling_tensors([], [], [], [], [], [], B, self.history_len, self.spec.vocab_size)
            return logits, jax.tree.map(pl.abstract, st), flag
        if key.kind in ("prefill", "score"):
            T, nbt = key.size, self.config.max_blocks_per_seq
            batch = (i32(B, T), i32(B, T), i32(B, T), i32(B, nbt), i32(B), i32(B))
            batch += (i32(B, T), flag) if key.kind == "score" else ()      # prompt-logprob targets, wanted?
        else:
            batch = (i32(B, 1), i32(B, 1), i32(B, 1), i32(B, key.size), i32(B))
        if key.kind in ("prefill", "decode") and self.fused_greedy:
            batch += (flag,)                                                # want_top of the fused greedy sampler
        spec_of = pl.abstract
        return (jax.tree.map(spec_of, self.params_for(key)), spec_of(self.k_cache), spec_of(self.v_cache), *batch)

    def fingerprint(self, key: GraphKey) -> dict:
        """Everything that changes the graph of `key` (never weight values): the graph-cache key."""
        import jaxlib
        dev = jax.devices()[0]
        return {"graph_version": GRAPH_VERSION, "key": dataclasses.asdict(key), "spec": self.spec.shape_key(),
                "args": str(jax.tree.map(lambda a: (a.shape, str(a.dtype)), self._abstract_args(key))),
                "platform": dev.platform, "device_kind": dev.device_kind, "num_devices": jax.device_count(),
                "mesh": self.placement.key.as_dict(), "matmul_dtype": self.matmul_dtype(key),
                "fused_greedy": self.fused_greedy and key.kind in ("prefill", "decode"),
                "jax": jax.__version__, "jaxlib": jaxlib.__version__, "xla_flags": self.config.env.xla_flags,
                "compiler_options": sorted((k, str(v)) for k, v in self.compiler_options.items())}

    def lower(self, key: GraphKey):
        if key.kind == "sample":
            return jax.jit(S.general_sample if key.size else S.greedy_sample,
                           **self.placement.out_shardings("sample")).lower(*self._abstract_args(key))
        fn = {"prefill": S.prefill_step, "decode": S.decode_step, "score": S.score_step}[key.kind]
        step = partial(fn, self.spec, self.spec.head_dim ** -0.5)
        pl = self.placement
        outs = pl.out_shardings(key.kind) if key.kind != "score" or pl.mesh is None else \
            {"out_shardings": (pl.kv, pl.kv) + (pl.replicated,) * 6}      # K, V, then six replicated outputs
        if key.kind in ("prefill", "decode") and self.fused_greedy:
            step = partial(S.with_greedy, step)
            outs = outs if pl.mesh is None else {"out_shardings": (pl.kv, pl.kv, pl.replicated, pl.replicated)}
        return jax.jit(step, donate_argnums=(1, 2), **outs).lower(*self._abstract_args(key))

    def is_cached(self, key: GraphKey) -> bool:
        """Whether the graph cache holds `key` (nothing is loaded or compiled)."""
        return self.cache is not None and self.cache.has(fingerprint_key(self.fingerprint(key)))

    def load_or_compile(self, key: GraphKey) -> str:
        """Make `key`'s executable available: from the graph cache ("hit") or by compiling ("compiled")."""
        if key in self.executables:
            return "loaded"
        cache_key = fingerprint_key(self.fingerprint(key)) if self.cache else None
        if self.cache is not None:
            exe = self.cache.load(cache_key, devices=self.placement.devices)
            if exe is not None:
                self.executables[key] = exe
                self.graph_memory[key] = self.cache.manifest().get(cache_key, {}).get("memory_bytes", 0)
                return "hit"
        self.guard.check(str(key))
        t0 = time.perf_counter()
        exe = self.lower(key).compile(compiler_options=dict(self.compiler_options) or None)
        dt = time.perf_counter() - t0
        mem = exe.memory_analysis()
        nbytes = (mem.temp_size_in_bytes + mem.generated_code_size_in_bytes) if mem is not None else 0
        self.executables[key], self.graph_memory[key] = exe, nbytes
        self.compile_log.append((key, dt))
        log.info("compiled %s in %.2fs (%.1f MiB)", key, dt, nbytes / 2**20)
        if self.cache is not None:
            self.cache.store(cache_key, exe, {"graph": str(key), "compile_s": round(dt, 3), "memory_bytes": nbytes})
        return "compiled"

    def _graph_for(self, kind: str, batch: int, size: int) -> tuple[GraphKey, jax.stages.Compiled]:
        """The smallest compiled graph holding (batch, size); compiles the exact bucket only if allowed.
        A sampler graph takes logits of exactly its batch size."""
        plan = self.config.buckets
        if kind == "sample":
            b, s = batch, size
        else:
            b, s = plan.decode_bucket(batch, size) if kind == "decode" else plan.prefill_bucket(batch, size)
        key = GraphKey(kind, b, s)
        if key not in self.executables and kind == "sample":
            self.load_or_compile(key)
        elif key not in self.executables:
            fits = [k for k in self.executables if k.kind == kind and k.batch >= b and k.size >= s]
            if fits and not self.guard.allow_lazy:
                key = min(fits, key=lambda k: (k.batch * k.size, k.batch))
            else:
                self.load_or_compile(key)
        return key, self.executables[key]

    # -- scoring: prompt logprobs and embeddings ---------------------------------------------------
    scoring_warmed = False       # warmup built a score graph for every prefill graph (--warmup-scoring)

    def prompt_logprobs_unavailable(self) -> str | None:
        if self.guard.armed and not self.guard.allow_lazy and not self.scoring_warmed:
            return ("the jax backend scores prompts (prompt_logprobs, echo, embeddings) with graphs this engine "
                    "did not build in warmup; start it with --warmup-scoring (or --allow-lazy-compile)")
        return None

    def _execute_score(self, step: SchedulerOutput) -> StepResult:
        """A prefill through the score graph of its bucket: the rows' prompt logprobs and pooled hidden states
        beside the sampled tokens."""
        rows, bs = step.rows, self.config.cache.block_size
        key, exe = self._graph_for("score", len(rows), max(len(r.token_ids) for r in rows))
        x = I.prepare_step(rows, block_size=bs, batch=key.batch, seq_len=key.size,
                           table_width=self.config.max_blocks_per_seq)
        targets = I.prompt_targets(rows, batch=key.batch, seq_len=key.size)
        want_lp = any(r.sampling_params.prompt_logprobs is not None for r in rows)
        self._stats.add_step(str(key), step.num_tokens, x.computed_tokens)
        args = self.placement.inputs((x.tokens, x.positions, x.slots, x.tables, x.starts, x.lens, targets,
                                      np.bool_(want_lp)))
        self.k_cache, self.v_cache, logits, *scored = exe(self.params_for(key), self.k_cache, self.v_cache, *args)
        res = self._sample(rows, logits, key.batch)
        tgt, top_i, top_lp, h_sum, h_last = jax.device_get(scored)
        if want_lp:
            res.prompt_logprobs = I.prompt_logprob_entries(rows, targets, tgt, top_i, top_lp)
        res.hidden = I.pooled_hidden(rows, h_sum, h_last)
        return res

    # -- one step ---------------------------------------------------------------------------------
    def execute(self, step: SchedulerOutput) -> StepResult:
        return self._execute_mixed(step) if step.kind == "mixed" else self._execute_one_kind(step)

    def _execute_one_kind(self, step: SchedulerOutput) -> StepResult:
        rows, bs = step.rows, self.config.cache.block_size
        if step.kind == "prefill" and any(r.scores for r in rows):
            return self._execute_score(step)
        if step.kind == "prefill":
            key, exe = self._graph_for("prefill", len(rows), max(len(r.token_ids) for r in rows))
            x = I.prepare_step(rows, block_size=bs, batch=key.batch, seq_len=key.size,
                               table_width=self.config.max_blocks_per_seq)
            args = (x.tokens, x.positions, x.slots, x.tables, x.starts, x.lens)
        else:
            key, exe = self._graph_for("decode", len(rows), max(len(r.block_table) for r in rows))
            x = I.prepare_step(rows, block_size=bs, batch=key.batch, seq_len=1, table_width=key.size)
            args = (x.tokens, x.positions, x.slots, x.tables, x.starts)
        self._stats.add_step(str(key), step.num_tokens, x.computed_tokens)
        if not self.fused_greedy:
            args = self.placement.inputs(args)                       # global arrays on a mesh
            self.k_cache, self.v_cache, logits = exe(self.params_for(key), self.k_cache, self.v_cache, *args)
            return self._sample(rows, logits, key.batch)
        args = self.placement.inputs((*args, np.bool_(I.logprobs_wanted(rows) > 0)))
        self.k_cache, self.v_cache, logits, greedy = exe(self.params_for(key), self.k_cache, self.v_cache, *args)
        if all(I.is_plain_greedy(r) for r in rows):
            return self._result(rows, jax.device_get(greedy))       # one executable, one host sync
        return self._sample(rows, logits, key.batch)

    def _execute_mixed(self, step: SchedulerOutput) -> StepResult:
        """A mixed step as the decode graph over its 1-token rows, then the prefill (or score) graph over its
        chunks, back to back: only graphs warmup built. (One prefill bucket holding both would pad every decode
        row to the chunk length: 16 decodes + a 128-token chunk is a [32, 128] bucket, over the default budget;
        scripts/bench_mixed_jax.py measured both ways, see BENCHMARKS.md.)"""
        dec = [i for i, r in enumerate(step.rows) if len(r.token_ids) == 1 and not r.scores]
        pre = [i for i in range(len(step.rows)) if i not in set(dec)]
        parts = [(idx, kind) for idx, kind in ((dec, "decode"), (pre, "prefill")) if idx]
        results = [self._execute_one_kind(dataclasses.replace(step, kind=kind, rows=[step.rows[i] for i in idx],
                                                    preempted=[])) for idx, kind in parts]
        if len(results) == 1:
            return results[0]
        self._stats.steps -= 1                     # one engine step, counted once (its graphs per bucket each)
        return merge_results([idx for idx, _ in parts], results, len(step.rows))

    def _sample(self, rows, logits, B: int) -> StepResult:
        """Tokens for the rows from logits [B, V] by the sampler graph of batch B (plain greedy or general)."""
        want_lp = I.logprobs_wanted(rows)
        want_top = np.bool_(want_lp > 0)
        pl = self.placement
        if all(I.is_plain_greedy(r) for r in rows):
            res = self._graph_for("sample", B, 0)[1](*pl.inputs((logits, want_top)))
        else:
            st = I.sampling_tensors(rows, batch=B, history_len=self.history_len, vocab_size=self.spec.vocab_size)
            res = self._graph_for("sample", B, 1)[1](*pl.inputs((logits, st, want_top)))
        return self._result(rows, jax.device_get(res))             # the step's one host sync

    @staticmethod
    def _result(rows, res: SampleOutput) -> StepResult:
        want_lp = I.logprobs_wanted(rows)
        n = len(rows)
        top = None
        if want_lp:
            top = [list(zip(res.top_ids[i, :want_lp].tolist(), res.top_logprobs[i, :want_lp].tolist()))
                   for i in range(n)]
        return StepResult(res.tokens[:n].tolist(), res.logprobs[:n].tolist(), top)


def merge_results(parts: list[list[int]], results: list[StepResult], n: int) -> StepResult:
    """One StepResult of n rows from results of disjoint parts (row indexes per part). A list only some parts
    returned (top-N, prompt logprobs, hidden) gets [] / None in the others' rows, which asked for none of it."""
    def merge(field: str, fill):
        if all(getattr(r, field) is None for r in results):
            return None
        out = [fill] * n
        for idx, r in zip(parts, results):
            vals = getattr(r, field)
            for j, i in enumerate(idx):
                out[i] = fill if vals is None else vals[j]
        return out
    return StepResult(merge("tokens", 0), merge("logprobs", 0.0), merge("top", []), merge("prompt_logprobs", None),
                      merge("hidden", None))
