"""The torch runner: SchedulerOutput in, StepResult out, the model step run eagerly by backends/torch/model
on oneDNN/ATen CPU kernels and kiln's C++ kernels, and tokens sampled in torch (backends/torch/sampler).

    SchedulerOutput ──> backends/inputs.prepare_step over the real rows only (prefill rows padded to the
                        longest row of the step, decode rows one token each) ──> numpy arrays
                        (a mixed step: mixed.forward_mixed, its decode rows and prefill chunks in one forward)
                    ──> TM.forward (K/V written into the cache in place) ──> logits [n, V] float32
                        (a prefill with prompt-logprob or embedding rows: also every position's final-normed
                        hidden state ──> prompt logprobs through the head, pooled sums for StepResult.hidden)
                    ──> plain greedy rows without logprobs: argmax; else sampler.sample ──> StepResult
                        (a verify step, rows with drafts: every position's hidden state, the head and the
                        sampler on each row's last num_draft + 1 positions: backends/verify)

There is no graph to compile: `warmup()` builds (first run on the machine) or loads the C++ kernels.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from kiln.backends import inputs as I
from kiln.backends import verify
from kiln.backends.base import ModelRunner, RunnerStats, StepResult
from kiln.backends.torch import kernels, mixed, sampler
from kiln.backends.torch import model as TM
from kiln.backends.torch.weights import Weights, load_weights
from kiln.compile.warmup import WarmupReport
from kiln.config import EngineConfig
from kiln.engine.sampling_params import MAX_LOGPROBS
from kiln.engine.scheduler_output import SchedulerOutput
from kiln.models.spec import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

PREFILL_ALIGN = 16
"""A prefill step's length is padded to a multiple of this. oneDNN and ATen cache kernels and scratch space per
shape; with every prompt length its own shape, a server's RSS grew by ~300 MB over a 5-minute soak (flat with
repeated shapes). Rounding bounds the shapes a server sees (and so that memory) for at most 15 padded tokens a row."""


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class TorchRunner(ModelRunner):
    """Owns the weights and the paged KV cache (K [L, NB, KVH, Dh, bs], V [L, NB, KVH, bs, Dh]) on the CPU."""

    name = "torch"
    compiled_kinds = ()                                         # nothing is compiled per shape

    def __init__(self, *, spec: ModelSpec, config: EngineConfig, tensors):
        kernels.load()                       # build (first run on this machine) or load the CPU kernels now
        dtype = DTYPES[config.dtype]
        q = config.model.quantization
        int4 = q in ("auto", "exact", "blocks")    # exact quantised copies (weights.load_weights decides)
        int8_act = q == "blocks" or (q == "auto" and dtype == torch.bfloat16)   # auto float32: float32's numerics
        self._setup(spec, config, load_weights(spec, tensors, dtype, int4, config.scheduler.max_model_len,
                                               int8_act=int8_act, dense=q != "blocks"))

    def _setup(self, spec: ModelSpec, config: EngineConfig, weights: Weights) -> None:
        self.spec, self.params, self.config = spec, weights, config
        cc = config.cache
        L, NB, KVH, bs, Dh = spec.num_layers, cc.num_blocks, spec.num_kv_heads, cc.block_size, spec.head_dim
        dtype = DTYPES[config.kv_dtype]
        self.k_cache = torch.zeros((L, NB, KVH, Dh, bs), dtype=dtype)   # K, transposed within a block
        self.v_cache = torch.zeros((L, NB, KVH, bs, Dh), dtype=dtype)   # V
        self._stats = RunnerStats()
        log.info("KV cache: %d blocks x %d tokens (%.2f GiB)", NB, bs,
                 (self.k_cache.nbytes + self.v_cache.nbytes) / 2**30)

    @classmethod
    def kv_bytes_per_block(cls, *, spec: ModelSpec, block_size: int, kv_dtype: str) -> int:
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * DTYPES[kv_dtype].itemsize

    def warmup(self, *, check_only: bool = False, show_progress: bool = True) -> WarmupReport:
        """Nothing to compile per shape; the C++ kernels are built (or loaded) here unless check_only."""
        if not check_only:
            kernels.load()
        return WarmupReport(kv_bytes=self.config.memory.kv_bytes)

    def stats(self) -> RunnerStats:
        return dataclasses.replace(self._stats, padding_by_bucket=dict(self._stats.padding_by_bucket))

    # -- one step ---------------------------------------------------------------------------------
    def execute(self, step: SchedulerOutput) -> StepResult:
        if step.kind != "mixed":
            return self._execute_one_kind(step)
        drafts = [i for i, r in enumerate(step.rows) if r.num_draft]
        if not drafts:
            return self._execute_mixed(step)
        # verify rows (speculative decoding) beside prefill chunks: the verify rows as a decode step of their
        # own, then the rest as a mixed step
        rest = sorted(set(range(len(step.rows))) - set(drafts))
        sub = lambda idx, kind: dataclasses.replace(step, kind=kind, rows=[step.rows[i] for i in idx])
        parts = [self._execute_one_kind(sub(drafts, "decode"))] + ([self._execute_mixed(sub(rest, "mixed"))]
                                                                  if rest else [])
        return _in_order(_concat(parts, [len(drafts), len(rest)]), drafts + rest)

    def _execute_one_kind(self, step: SchedulerOutput) -> StepResult:
        rows = step.rows
        spec = any(r.num_draft for r in rows)     # a verify step: 1 + drafts per row, at most 1 + K (no rounding)
        T = _round_up(max(len(r.token_ids) for r in rows), PREFILL_ALIGN) if step.kind == "prefill" else \
            max(len(r.token_ids) for r in rows) if spec else 1
        x = I.prepare_step(rows, block_size=self.config.cache.block_size, batch=len(rows), seq_len=T,
                           table_width=max(len(r.block_table) for r in rows))
        score = step.kind == "prefill" and any(r.scores for r in rows)    # prompt logprobs or embeddings
        out = TM.forward(self.spec, self.params, self.k_cache, self.v_cache, self.config.cache.block_size,
                         x.tokens, x.positions, x.slots, x.tables, x.lens, all_positions=score or spec)
        self._stats.add_step(f"{step.kind}(batch={len(rows)}, seq_len={T})", step.num_tokens, x.computed_tokens)
        if spec:
            return self._verify(rows, out[1], x.lens)
        if not score:
            return self._sample(rows, out)                                 # logits [n, V] float32
        logits, h = out                                                    # h [n, T, D] final-normed, float32
        res = self._sample(rows, logits)
        res.prompt_logprobs, res.hidden = self._scores(rows, h, x.lens)
        return res

    def _scores(self, rows, h: torch.Tensor, lens) -> tuple[list | None, list | None]:
        """(StepResult.prompt_logprobs, StepResult.hidden) of prefill rows from every position's final-normed
        hidden state h [n, T, D] float32, lens [n] their real tokens; None where no row asked."""
        plp = hidden = None
        with torch.inference_mode():
            if any(r.sampling_params.prompt_logprobs is not None for r in rows):
                plp = self._prompt_logprobs(rows, h)
            if any(r.pooling is not None for r in rows):                   # embeddings: pooled sums
                n, T = h.shape[:2]
                lens = torch.from_numpy(lens).long()
                real = (torch.arange(T)[None, :] < lens[:, None])[..., None]                  # [n, T, 1]
                h_last = h[torch.arange(n), lens - 1]                                         # [n, D]
                hidden = I.pooled_hidden(rows, (h * real).sum(1).numpy(), h_last.numpy())
        return plp, hidden

    def _execute_mixed(self, step: SchedulerOutput) -> StepResult:
        """Decode rows (one token, not scoring) and prefill chunks in one forward (mixed.forward_mixed), sampled in
        one call; the rows may come in any order (a fault-isolation half may hold only one kind)."""
        dec = [i for i, r in enumerate(step.rows) if len(r.token_ids) == 1 and not r.scores]
        pre = sorted(set(range(len(step.rows))) - set(dec))
        if not dec or not pre:
            return self._execute_one_kind(dataclasses.replace(step, kind="prefill" if pre else "decode"))
        order = dec + pre
        rows = [step.rows[i] for i in order]
        d_rows, p_rows = rows[:len(dec)], rows[len(dec):]
        bs = self.config.cache.block_size
        T = _round_up(max(len(r.token_ids) for r in p_rows), PREFILL_ALIGN)
        xd = I.prepare_step(d_rows, block_size=bs, batch=len(d_rows), seq_len=1,
                            table_width=max(len(r.block_table) for r in d_rows))
        xp = I.prepare_step(p_rows, block_size=bs, batch=len(p_rows), seq_len=T,
                            table_width=max(len(r.block_table) for r in p_rows))
        score = any(r.scores for r in p_rows)
        out = mixed.forward_mixed(self.spec, self.params, self.k_cache, self.v_cache, bs, xd, xp,
                                  align=PREFILL_ALIGN, all_positions=score)
        self._stats.add_step(f"mixed(decode={len(d_rows)}, prefill={len(p_rows)}, seq_len={T})", step.num_tokens,
                             _round_up(step.num_tokens, PREFILL_ALIGN))
        res = self._sample(rows, out[0] if score else out)
        if score:                                                          # the decode rows score nothing
            none = [None] * len(d_rows)
            plp, hidden = self._scores(p_rows, out[1], xp.lens)
            res.prompt_logprobs, res.hidden = (None if v is None else none + v for v in (plp, hidden))
        return _in_order(res, order)

    def _verify(self, rows, h: torch.Tensor, lens) -> StepResult:
        """Speculative decoding: sample each row at its last num_draft + 1 positions of h [n, T, D] (the head run
        on those positions only), each as the plain decode row of that output index (backends/verify)."""
        b, t = verify.positions(rows, lens)
        with torch.inference_mode():
            logits = TM.head(self.spec, self.params, h[torch.from_numpy(b), torch.from_numpy(t)].contiguous())
        return verify.regroup(rows, self._sample(verify.expand(rows), logits))          # logits [M, V]

    def _prompt_logprobs(self, rows, h: torch.Tensor) -> list:
        """StepResult.prompt_logprobs from every position's hidden state h [n, T, D] (rows that did not ask get
        None; only the rows that asked are run through the head: [rows, T, V] float32 in memory)."""
        n, T, D = h.shape
        asked = [i for i, r in enumerate(rows) if r.sampling_params.prompt_logprobs is not None]
        targets = I.prompt_targets(rows, batch=n, seq_len=T)                          # [n, T]
        lp = torch.log_softmax(TM.head(self.spec, self.params, h[asked].reshape(-1, D)), -1).view(len(asked), T, -1)
        tgt = torch.zeros(n, T)
        top_lp, top_ids = torch.zeros(n, T, MAX_LOGPROBS), torch.zeros(n, T, MAX_LOGPROBS, dtype=torch.long)
        tgt[asked] = lp.gather(-1, torch.from_numpy(targets[asked]).long().clamp(min=0)[..., None])[..., 0]
        top_lp[asked], top_ids[asked] = lp.topk(MAX_LOGPROBS, -1)
        return I.prompt_logprob_entries(rows, targets, tgt.numpy(), top_ids.numpy(), top_lp.numpy())

    def _sample(self, rows, logits: torch.Tensor) -> StepResult:
        want_lp = I.logprobs_wanted(rows)
        if not want_lp and all(I.is_plain_greedy(r) for r in rows):
            return StepResult(logits.argmax(-1).tolist(), [0.0] * len(rows), None)
        history = max((len(r.history) for r in rows), default=0)
        st = I.sampling_tensors(rows, batch=len(rows), history_len=max(history, 1), vocab_size=logits.shape[-1])
        out = sampler.sample(logits, st, num_logprobs=want_lp)
        top = None
        if want_lp:
            top = [list(zip(i, v)) for i, v in zip(out.top_ids.tolist(), out.top_logprobs.tolist())]
        return StepResult(out.tokens.tolist(), out.logprobs.tolist(), top)


def _in_order(res: StepResult, order: list[int]) -> StepResult:
    """`res` of rows taken in `order` (a permutation of the step's rows) back in the step's own order."""
    if order == sorted(order):
        return res
    inv = sorted(range(len(order)), key=order.__getitem__)
    pick = lambda xs: None if xs is None else [xs[j] for j in inv]
    return StepResult(pick(res.tokens), pick(res.logprobs), pick(res.top), pick(res.prompt_logprobs),
                      pick(res.hidden), pick(res.spec_tokens))


def _concat(parts: list[StepResult], sizes: list[int]) -> StepResult:
    """The StepResults of consecutive groups of rows (`sizes` rows each) as one, row after row."""
    def join(name):
        if all(getattr(p, name) is None for p in parts):
            return None
        return [x for p, n in zip(parts, sizes) for x in (getattr(p, name) or [None] * n)]
    return StepResult(*(join(f.name) for f in dataclasses.fields(StepResult)))
