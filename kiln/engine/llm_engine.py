"""The synchronous engine: add requests, step, abort. Everything above it (LLM, AsyncEngine) drives this.

    add_request ─> validate ─> n child Requests (sample i of request R is `R` for n=1, else `R#i`)
    step():  scheduler.schedule() ─> runner.execute() ─> scheduler.on_step_done()
             ─> per sampled row: append token, detokenize, check stop conditions, finish
             ─> RequestOutput for every parent that changed (cumulative text and tokens)

Samples of one request share the prompt's KV blocks through the prefix cache.

Faults are contained to the requests they touch:
- runner.execute raises (or returns a result of the wrong length): the step's rows are run again in halves,
  recursively (at most MAX_EXECUTES_PER_STEP calls), so the rows that fail on their own are found; the others
  keep their results (a row's K/V write and its seeded draw are the same on a retry). Rows with a token outside
  the vocabulary fail alone.
- post-processing one row raises (detokenizer, stop checks): only that row's request fails.
A failed request's samples are finished (blocks freed) and step() raises StepError({request id: cause}) with the
other requests' outputs. After MAX_FAILED_STEPS_IN_A_ROW steps in which no row could run, or on any error of
the scheduler itself, the engine is dead: step() and validate() raise EngineDeadError from then on.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import operator
import random

from kiln.backends.base import ModelRunner, StepResult
from kiln.backends.inputs import check_supported
from kiln.config import EngineConfig
from kiln.engine.detokenizer import IncrementalDetokenizer
from kiln.engine.errors import EngineDeadError, StepError
from kiln.engine.outputs import CompletionOutput, RequestOutput
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


@dataclasses.dataclass
class _Sample:
    """One of a parent's n samples: its scheduler request, detokenizer and output so far."""
    request: Request
    detok: IncrementalDetokenizer
    output: CompletionOutput


@dataclasses.dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]
    prompt_logprobs: list | None = None     # [prompt len]: None first, then {token: logprob} per position

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [dataclasses.replace(s.output, token_ids=list(s.output.token_ids),
                                                  logprobs=None if s.output.logprobs is None
                                                  else list(s.output.logprobs)) for s in self.samples],
                             finished=all(s.output.finished for s in self.samples),
                             num_cached_tokens=max(self.samples[0].request.num_cached_tokens, 0),
                             prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs))


class LLMEngine:
    def __init__(self, config: EngineConfig, spec: ModelSpec, runner: ModelRunner, tokenizer: Tokenizer):
        self.config, self.spec, self.runner, self.tokenizer = config, spec, runner, tokenizer
        self.scheduler = Scheduler(config)
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, tuple[_Parent, _Sample]] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_steps = 0
        self.structured = StructuredState(getattr(tokenizer, "hf", None), spec.vocab_size, spec.eos_token_ids)

    # -- requests ---------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the field and the limit for input the engine cannot serve.

        `params` is verified again (a field may have been set after it was built). A `max_tokens` beyond the
        context is not an error: the request finishes with `length` when the context is full (SamplingParams).
        Raises EngineDeadError once the engine is dead.
        """
        if self._dead is not None:
            raise EngineDeadError(str(self._dead)) from self._dead.__cause__
        max_len = self.config.scheduler.max_model_len
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.verify()
        if not prompt_token_ids:
            raise ValueError("prompt is empty: it must hold at least one token")
        if len(prompt_token_ids) >= max_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens; max_model_len is {max_len} and at "
                             f"least one token must be left to generate")
        bad = [t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)
               or not 0 <= t < self.spec.vocab_size]
        if bad:
            shown = "a huge integer" if isinstance(bad[0], int) and abs(bad[0]) >= 2**64 else repr(bad[0])[:40]
            raise ValueError(f"prompt_token_ids holds {shown}, outside the vocabulary [0, {self.spec.vocab_size})")
        params.validate_for_vocab(self.spec.vocab_size)
        check_supported(params, len(self.spec.eos_token_ids))
        self.structured.validate(params)
        if params.prompt_logprobs is not None and (why := self.runner.prompt_logprobs_unavailable()):
            raise ValueError(f"prompt_logprobs is not available: {why}")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prompt_text: str | None = None) -> str:
        """Queue a prompt (text or token ids); returns its request id. Raises ValueError for bad input."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = prompt_text, [int(t) for t in prompt]
        self.validate(ids, params)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._parents:
            raise ValueError(f"request_id {rid!r} is already in use")
        parent = _Parent(rid, text, ids, [], None if params.prompt_logprobs is None else [None] * len(ids))
        for i in range(params.n):
            cid = rid if params.n == 1 else f"{rid}#{i}"
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(32)
            req = Request(cid, list(ids), params, seed, eos_token_ids=() if params.ignore_eos else self.spec.eos_token_ids)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)
            out = CompletionOutput(i, "", [], 0.0 if params.logprobs is not None else None,
                                   [] if params.logprobs is not None else None)
            sample = _Sample(req, detok, out)
            parent.samples.append(sample)
            self._child_to_parent[cid] = (parent, sample)
            self.structured.add(cid, params)
            self.scheduler.add_request(req)
        self._parents[rid] = parent
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
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

    def step(self) -> list[RequestOutput]:
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
        for r in sched.rows:                     # prompt logprobs: the target after each chunk
            if r.sampling_params.prompt_logprobs is not None and r.start_pos + len(r.token_ids) < r.prompt_len:
                r.next_token_id = self._child_to_parent[r.request_id][0].prompt_token_ids[
                    r.start_pos + len(r.token_ids)] if r.request_id in self._child_to_parent else -1
        results, row_errors = self._execute_isolating(sched, list(range(len(sched.rows))),
                                                      [MAX_EXECUTES_PER_STEP])
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
            if parent.prompt_logprobs is not None and results[i][3] is not None and sample.output.index == 0:
                self._prompt_logprobs(parent, row, results[i][3])
            if row.sample:
                try:
                    self._append(sample, row, results[i])
                    changed[parent.request_id] = parent
                except EngineDeadError:
                    raise
                except Exception as e:  # noqa: BLE001 - a fault of this request only
                    failed[parent.request_id] = e
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

    # -- fault isolation --------------------------------------------------------------------------
    def _execute_isolating(self, sched, idx: list[int], budget: list[int], cause: BaseException | None = None):
        """Run rows `idx` of `sched` (a SchedulerOutput); on an error run each half again, down to single rows.

        The whole step spends at most `budget[0]` runner calls; rows left when it runs out fail with `cause`
        (the error of the larger part they were in). Returns ({row index: (token, logprob, top)},
        {row index: exception}) covering every index.
        """
        if budget[0] <= 0 and cause is not None:
            return {}, dict.fromkeys(idx, cause)
        budget[0] -= 1
        step = sched if len(idx) == len(sched.rows) else dataclasses.replace(
            sched, rows=[sched.rows[i] for i in idx], preempted=[])
        try:
            result: StepResult = self.runner.execute(step)
            if len(result.tokens) != len(idx) or len(result.logprobs) != len(idx) or \
                    (result.top is not None and len(result.top) != len(idx)):
                raise RuntimeError(f"runner returned {len(result.tokens)} tokens for {len(idx)} rows")
        except Exception as e:  # noqa: BLE001 - isolated below
            if len(idx) == 1:
                return {}, {idx[0]: e}
            result, error = None, e    # retried outside the except block, so tracebacks do not chain
        if result is None:
            ok_a, bad_a = self._execute_isolating(sched, idx[:len(idx) // 2], budget, error)
            ok_b, bad_b = self._execute_isolating(sched, idx[len(idx) // 2:], budget, error)
            return {**ok_a, **ok_b}, {**bad_a, **bad_b}
        results, failures = {}, {}
        vocab = self.spec.vocab_size
        for j, i in enumerate(idx):
            try:
                token = operator.index(result.tokens[j])
                if not 0 <= token < vocab:
                    raise RuntimeError(f"runner returned token {token}, outside the vocabulary [0, {vocab})")
                results[i] = (token, result.logprobs[j], None if result.top is None else result.top[j],
                              None if result.prompt_logprobs is None else result.prompt_logprobs[j])
            except Exception as e:  # noqa: BLE001 - this row only
                failures[i] = e
        return results, failures

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

    def _append(self, s: _Sample, row: ScheduledRow, sampled: tuple) -> None:
        req, params, out = s.request, s.request.sampling_params, s.output
        token, logprob, top = sampled[:3]
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

    @staticmethod
    def _prompt_logprobs(parent: _Parent, row: ScheduledRow, plp: list) -> None:
        """Record a prefill chunk's prompt logprobs: position j predicts prompt token start_pos + j + 1 (a
        recomputed chunk, after preemption, writes the same entries again)."""
        k = row.sampling_params.prompt_logprobs
        for j, entry in enumerate(plp):
            pos = row.start_pos + j + 1
            if entry is None or pos >= len(parent.prompt_token_ids):
                continue
            lp, top = entry
            d = {parent.prompt_token_ids[pos]: lp}
            d.update((t, v) for t, v in top[:k] if t not in d)
            parent.prompt_logprobs[pos] = d

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
                  padding_tokens=rs.padding_tokens, real_tokens=rs.real_tokens, computed_tokens=rs.computed_tokens)
        return st
