"""The synchronous engine: add requests, step, abort. Everything above it (LLM, AsyncEngine) drives this.

    add_request ─> validate ─> n child Requests (engine/parents: sample i of request R is `R` for n=1, else `R#i`)
    step():  scheduler.schedule() ─> runner.execute() (engine/isolation) ─> scheduler.on_step_done()
             ─> per sampled row: append token, detokenize, check stop conditions, finish (a verify row,
                speculative decoding: its accepted drafts and the next token, one by one; engine/speculative)
             ─> per pooling row (embeddings, engine/pooling): add the chunk's hidden states; pool after the last
             ─> speculative decoding: drafts for every request that sampled (engine/speculative.drafts)
             ─> RequestOutput / EmbeddingRequestOutput for every parent that changed (cumulative)

Samples of one request share the prompt's KV blocks through the prefix cache.

Faults are contained to the requests they touch: a runner error is isolated to the rows that fail on their own
(engine/isolation); post-processing one row that raises (detokenizer, stop checks) fails only its request. A
failed request's samples are finished (blocks freed) and step() raises StepError({request id: cause}) with the
other requests' outputs. After MAX_FAILED_STEPS_IN_A_ROW steps in which no row could run, or on any error of
the scheduler itself, the engine is dead: step() and validate() raise EngineDeadError from then on.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import random

from kiln.backends.base import ModelRunner
from kiln.backends.inputs import check_supported
from kiln.config import EngineConfig
from kiln.engine import speculative
from kiln.engine.detokenizer import IncrementalDetokenizer
from kiln.engine.errors import EngineDeadError, StepError
from kiln.engine.isolation import RowResult, execute_isolating
from kiln.engine.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
from kiln.engine.parents import _Parent, _Sample, set_next_prompt_tokens
from kiln.engine.pooling import PoolingParams
from kiln.engine.request import Request
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler import Scheduler
from kiln.engine.scheduler_output import ScheduledRow
from kiln.models.spec import ModelSpec
from kiln.models.tokenizer import Tokenizer
from kiln.structured.state import StructuredState

log = logging.getLogger(__name__)

MAX_FAILED_STEPS_IN_A_ROW = 3
"""Steps in a row in which runner.execute failed for every row before the engine declares itself dead."""

MAX_EXECUTES_PER_STEP = 24
"""Runner calls one step may spend isolating a fault: one bad row among 2048 costs 1 + 2 * 11 = 23, while a
broken device fails the step after 24 calls instead of 2 * rows - 1."""


class LLMEngine:
    def __init__(self, config: EngineConfig, spec: ModelSpec, runner: ModelRunner, tokenizer: Tokenizer):
        self.config, self.spec, self.runner, self.tokenizer = config, spec, runner, tokenizer
        self.scheduler = Scheduler(config)
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, tuple[_Parent, _Sample]] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_steps = 0
        self.spec_stats = speculative.SpecStats()
        self.structured = StructuredState(getattr(tokenizer, "hf", None), spec.vocab_size, spec.eos_token_ids)

    # -- requests ---------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams | PoolingParams) -> None:
        """Raise ValueError naming the field and the limit for input the engine cannot serve (EngineDeadError
        once the engine is dead). `params` is verified again (a field may have been set after it was built); a
        `max_tokens` beyond the context finishes with `length`. PoolingParams (embeddings) may fill max_model_len."""
        if self._dead is not None:
            raise EngineDeadError(str(self._dead)) from self._dead.__cause__
        if isinstance(params, PoolingParams):
            params.verify()
            self._check_prompt(prompt_token_ids, room=0)
            if self.runner is not None and (why := self.runner.prompt_logprobs_unavailable()):
                raise ValueError(f"embeddings are not available: {why}")
            return
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.verify()
        self._check_prompt(prompt_token_ids, room=1)
        params.validate_for_vocab(self.spec.vocab_size)
        check_supported(params, len(self.spec.eos_token_ids))
        self.structured.validate(params)
        if params.prompt_logprobs is not None and self.runner is not None and \
                (why := self.runner.prompt_logprobs_unavailable()):     # None: a Ray ingress's shadow engine
            raise ValueError(f"prompt_logprobs is not available: {why}")

    def _check_prompt(self, prompt_token_ids: list[int], room: int) -> None:
        """Non-empty, in the vocabulary, and at most max_model_len - room tokens."""
        max_len = self.config.scheduler.max_model_len
        if not prompt_token_ids:
            raise ValueError("prompt is empty: it must hold at least one token")
        if len(prompt_token_ids) > max_len - room:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens; max_model_len is {max_len}"
                             + (" and at least one token must be left to generate" if room else ""))
        bad = [t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)
               or not 0 <= t < self.spec.vocab_size]
        if bad:
            shown = "a huge integer" if isinstance(bad[0], int) and abs(bad[0]) >= 2**64 else repr(bad[0])[:40]
            raise ValueError(f"prompt_token_ids holds {shown}, outside the vocabulary [0, {self.spec.vocab_size})")

    def add_request(self, prompt: str | list[int], params: SamplingParams | PoolingParams | None = None,
                    request_id: str | None = None, prompt_text: str | None = None) -> str:
        """Queue a prompt (text or token ids); returns its request id. Raises ValueError for bad input.
        With PoolingParams the request is an embedding: its output is an EmbeddingRequestOutput."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = prompt_text, [int(t) for t in prompt]
        self.validate(ids, params)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._parents:
            raise ValueError(f"request_id {rid!r} is already in use")
        pooling = params if isinstance(params, PoolingParams) else None
        if pooling is not None:               # prefill only: the token its last chunk samples is dropped
            params = SamplingParams(temperature=0.0, max_tokens=1)
        parent = _Parent(rid, text, ids, [], None if params.prompt_logprobs is None else [None] * len(ids),
                         pooling=pooling)
        for i in range(params.n):
            cid = rid if params.n == 1 else f"{rid}#{i}"
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(32)
            req = Request(cid, list(ids), params, seed, eos_token_ids=() if params.ignore_eos else self.spec.eos_token_ids,
                          pooling=None if pooling is None else pooling.pooling)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)
            out = CompletionOutput(i, "", [], 0.0 if params.logprobs is not None else None,
                                   [] if params.logprobs is not None else None)
            sample = _Sample(req, detok, out)
            parent.samples.append(sample)
            self._child_to_parent[cid] = (parent, sample)
            if pooling is None:
                self.structured.add(cid, params)
            self.scheduler.add_request(req)
        self._parents[rid] = parent
        return rid

    def abort(self, request_id: str) -> RequestOutput | EmbeddingRequestOutput | None:
        """Stop a request now (finish reason `abort`) and free its blocks."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return None
        for s in parent.samples:
            if not s.output.finished:
                self._finish(s, "abort")
        return parent.output()

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    # -- steps ------------------------------------------------------------------------------------
    # fault state, as class defaults so that __init__ stays as it is
    _dead: EngineDeadError | None = None     # set once the engine cannot go on
    _failed_steps_in_a_row = 0               # steps in a row in which no row could run

    @property
    def dead(self) -> EngineDeadError | None:
        """Why the engine stopped serving, or None while it is alive."""
        return self._dead

    def step(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        """Run one step; return a RequestOutput for every request that changed.

        Raises StepError when the step failed some requests (their blocks are freed; `error.outputs` holds the
        others' outputs) and EngineDeadError when the engine cannot go on.
        """
        if self._dead is not None:
            raise EngineDeadError(str(self._dead)) from self._dead.__cause__
        sched = self._scheduler_call(self.scheduler.schedule)
        if sched is None:
            return []
        self.structured.fill(sched.rows)        # the constrained rows' next-token masks
        set_next_prompt_tokens(sched.rows, self._child_to_parent)   # prompt logprobs: the target after each chunk
        results, row_errors = execute_isolating(self.runner, sched, list(range(len(sched.rows))),
                                                [MAX_EXECUTES_PER_STEP], self.spec.vocab_size)
        self._failed_steps_in_a_row = 0 if results else self._failed_steps_in_a_row + 1
        self._scheduler_call(self.scheduler.on_step_done, dataclasses.replace(
            sched, rows=[sched.rows[i] for i in sorted(results)]))
        self.num_steps += 1
        changed: dict[str, _Parent] = {}
        failed: dict[str, BaseException] = {}      # parent request id -> why
        for i, row in enumerate(sched.rows):
            entry = self._child_to_parent.get(row.request_id)
            if entry is None or entry[0].request_id in failed:
                continue
            parent, sample = entry
            if i in row_errors:
                failed[parent.request_id] = row_errors[i]
                continue
            res = results[i]
            if parent.prompt_logprobs is not None and res.prompt_logprobs is not None and sample.output.index == 0:
                parent.record_prompt_logprobs(row, res.prompt_logprobs)
            try:
                if parent.pooling is not None:      # an embedding: pooled after the last chunk, no token
                    if parent.record_hidden(row, res.hidden):
                        self._finish(sample, "stop")
                        changed[parent.request_id] = parent
                elif row.sample:
                    if row.num_draft:
                        self._append_verified(sample, row, res)
                    else:
                        self._append_token(sample, res.token, res.logprob, res.top)
                    changed[parent.request_id] = parent
            except EngineDeadError:
                raise
            except Exception as e:  # noqa: BLE001 - a fault of this request only
                failed[parent.request_id] = e
        if self.config.speculative.enabled:
            speculative.propose(self.scheduler.requests, sched.rows, self.config.speculative,
                                self.config.scheduler.max_model_len)
        outputs = self._outputs(changed, failed)
        if failed:
            self._fail_requests(failed)
        if self._failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
            cause = next(iter(failed.values()), None)
            self._die(f"runner.execute failed for every row of {self._failed_steps_in_a_row} steps in a row "
                      f"(last: {type(cause).__name__}: {cause})", cause)
        if failed:
            raise StepError(failed, outputs)
        return outputs

    def _outputs(self, changed: dict[str, _Parent], failed: dict[str, BaseException]) -> list[RequestOutput]:
        """The RequestOutput of every changed parent that did not fail; finished parents are forgotten."""
        outputs = []
        for rid, parent in changed.items():
            if rid in failed:
                continue
            try:
                out = parent.output()
            except Exception as e:  # noqa: BLE001 - this request only
                failed[rid] = e
                continue
            outputs.append(out)
            if out.finished:
                self._parents.pop(rid, None)
        return outputs

    def _fail_requests(self, failed: dict[str, BaseException]) -> None:
        """Finish every sample of these parents (reason `error`, blocks freed); log the step's fault once."""
        first = next(iter(failed.values()))
        log.error("engine step %d failed request(s) %s", self.num_steps, ", ".join(failed),
                  exc_info=(type(first), first, first.__traceback__))
        for rid in failed:
            self.discard(rid)

    def discard(self, request_id: str) -> None:
        """Forget a request in whatever state it is, even half added (finish reason `error`, blocks freed)."""
        parent = self._parents.pop(request_id, None)
        children = {cid for cid, (p, _) in self._child_to_parent.items() if p.request_id == request_id}
        children |= {s.request.request_id for s in parent.samples} if parent is not None else set()
        for cid in children:
            self._child_to_parent.pop(cid, None)
            self.structured.remove(cid)
            self._scheduler_call(self.scheduler.finish, cid, "error")

    def _scheduler_call(self, fn, *args):
        """Call into the scheduler; an error there breaks its invariants, so the engine dies."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - nothing can be trusted after this
            self._die(f"the scheduler failed: {type(e).__name__}: {e}", e)

    def _die(self, reason: str, cause: BaseException | None) -> None:
        self._dead = EngineDeadError(f"engine stopped: {reason}")
        self._dead.__cause__ = cause
        raise self._dead

    def _append_verified(self, s: _Sample, row: ScheduledRow, sampled: RowResult) -> None:
        """A verify row (engine/speculative): its accepted drafts and the token after them, one by one through
        the detokenizer and the stop checks; a stop ends the request there, the tokens after it are dropped."""
        emit = speculative.accepted(row.token_ids[len(row.token_ids) - row.num_draft:], sampled.spec)
        self.spec_stats.add(row.num_draft, len(emit) - 1)
        s.request.num_computed_tokens += len(emit) - 1      # the accepted drafts' K/V were written this step
        for token in emit:
            self._append_token(s, token, 0.0, None)         # (no logprobs: such requests do not draft)
            if s.output.finished:
                break

    def _append_token(self, s: _Sample, token: int, logprob: float, top: list | None) -> None:
        req, params, out = s.request, s.request.sampling_params, s.output
        req.output_token_ids.append(token)
        out.token_ids.append(token)
        if out.logprobs is not None:
            entry = {token: logprob}
            if top is not None and params.logprobs:
                entry.update(dict(top[:params.logprobs]))
            out.logprobs.append(entry)
            out.cumulative_logprob += logprob
        n_out = len(req.output_token_ids)
        grammar_done = self.structured.accept(req.request_id, token)
        hit_eos = token in req.eos_token_ids
        if not hit_eos:
            out.text += s.detok.add_tokens([token])
        if n_out >= params.min_tokens and (hit_eos or token in params.stop_token_ids):
            self._finish(s, "stop", None if hit_eos else token)
        elif s.detok.stopped_by is not None:
            self._finish(s, "stop", s.detok.stopped_by)
        elif grammar_done:                      # the grammar has ended: nothing else may follow
            self._finish(s, "stop")
        elif (params.max_tokens is not None and n_out >= params.max_tokens) or \
                req.num_tokens >= self.config.scheduler.max_model_len:
            self._finish(s, "length")

    def _finish(self, s: _Sample, reason: str, stop_reason=None) -> None:
        s.output.text += s.detok.flush()
        s.output.finish_reason, s.output.stop_reason = reason, stop_reason
        self._scheduler_call(self.scheduler.finish, s.request.request_id, reason, stop_reason)
        self._child_to_parent.pop(s.request.request_id, None)
        self.structured.remove(s.request.request_id)

    def stats(self) -> dict[str, float]:
        st = dict(self.scheduler.kv.stats())
        rs = self.runner.stats()
        st.update(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                  preemptions=self.scheduler.num_preemptions, compiles=rs.compiles,
                  compiles_while_serving=rs.compiles_while_serving, graph_cache_hits=rs.graph_cache_hits,
                  padding_tokens=rs.padding_tokens, real_tokens=rs.real_tokens, computed_tokens=rs.computed_tokens,
                  spec_draft_tokens=self.spec_stats.drafted, spec_accepted_tokens=self.spec_stats.accepted)
        return st
