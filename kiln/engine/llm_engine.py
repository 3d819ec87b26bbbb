"""The synchronous engine: add requests, step, abort. Everything above it (LLM, AsyncEngine) drives this.

    add_request ─> validate ─> n child Requests (sample i of request R is `R` for n=1, else `R#i`)
    step():  scheduler.schedule() ─> runner.execute() ─> scheduler.on_step_done()
             ─> per sampled row: append token, detokenize, check stop conditions, finish
             ─> RequestOutput for every parent that changed (cumulative text and tokens)

Samples of one request share the prompt's KV blocks through the prefix cache.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import random

from kiln.backends.jax.runner import JaxRunner, StepResult
from kiln.config import EngineConfig
from kiln.engine.detokenizer import IncrementalDetokenizer
from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.request import Request
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler import Scheduler
from kiln.engine.scheduler_output import ScheduledRow
from kiln.kernels.sampling import check_supported
from kiln.models.spec import ModelSpec
from kiln.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [dataclasses.replace(s.output, token_ids=list(s.output.token_ids),
                                                  logprobs=None if s.output.logprobs is None
                                                  else list(s.output.logprobs)) for s in self.samples],
                             finished=all(s.output.finished for s in self.samples),
                             num_cached_tokens=max(self.samples[0].request.num_cached_tokens, 0))


class LLMEngine:
    def __init__(self, config: EngineConfig, spec: ModelSpec, runner: JaxRunner, tokenizer: Tokenizer):
        self.config, self.spec, self.runner, self.tokenizer = config, spec, runner, tokenizer
        self.scheduler = Scheduler(config)
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, tuple[_Parent, _Sample]] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.num_steps = 0

    # -- requests ---------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the field and the limit for input the engine cannot serve.

        `params` is verified again (a field may have been set after it was built). A `max_tokens` beyond the
        context is not an error: the request finishes with `length` when the context is full (SamplingParams).
        """
        max_len = self.config.scheduler.max_model_len
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.verify()
        if not prompt_token_ids:
            raise ValueError("prompt is empty: it must hold at least one token")
        if len(prompt_token_ids) >= max_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens; max_model_len is {max_len} and at "
                             f"least one token must be left to generate")
        bad = [t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < self.spec.vocab_size]
        if bad:
            shown = bad[0] if not isinstance(bad[0], int) or abs(bad[0]) < 2**64 else "a huge integer"
            raise ValueError(f"prompt_token_ids holds {shown!s}, outside the vocabulary [0, {self.spec.vocab_size})")
        params.validate_for_vocab(self.spec.vocab_size)
        check_supported(params, len(self.spec.eos_token_ids))

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
        parent = _Parent(rid, text, ids, [])
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
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched is None:
            return []
        result: StepResult = self.runner.execute(sched)
        self.scheduler.on_step_done(sched)
        self.num_steps += 1
        changed: dict[str, _Parent] = {}
        for i, row in enumerate(sched.rows):
            if row.sample and row.request_id in self._child_to_parent:
                parent, sample = self._child_to_parent[row.request_id]
                self._append(sample, row, result, i)
                changed[parent.request_id] = parent
        outputs = []
        for parent in changed.values():
            outputs.append(parent.output())
            if outputs[-1].finished:
                del self._parents[parent.request_id]
        return outputs

    def _append(self, s: _Sample, row: ScheduledRow, result: StepResult, i: int) -> None:
        req, params, out = s.request, s.request.sampling_params, s.output
        token = result.tokens[i]
        req.output_token_ids.append(token)
        out.token_ids.append(token)
        if out.logprobs is not None:
            entry = {token: result.logprobs[i]}
            if result.top is not None and params.logprobs:
                entry.update(dict(result.top[i][:params.logprobs]))
            out.logprobs.append(entry)
            out.cumulative_logprob += result.logprobs[i]
        n_out = len(req.output_token_ids)
        hit_eos = token in req.eos_token_ids
        if not hit_eos:
            out.text += s.detok.add_tokens([token])
        if n_out >= params.min_tokens and (hit_eos or token in params.stop_token_ids):
            self._finish(s, "stop", None if hit_eos else token)
        elif s.detok.stopped_by is not None:
            self._finish(s, "stop", s.detok.stopped_by)
        elif (params.max_tokens is not None and n_out >= params.max_tokens) or \
                req.num_tokens >= self.config.scheduler.max_model_len:
            self._finish(s, "length")

    def _finish(self, s: _Sample, reason: str, stop_reason=None) -> None:
        s.output.text += s.detok.flush()
        s.output.finish_reason, s.output.stop_reason = reason, stop_reason
        self.scheduler.finish(s.request.request_id, reason, stop_reason)
        self._child_to_parent.pop(s.request.request_id, None)

    def stats(self) -> dict[str, float]:
        st = dict(self.scheduler.kv.stats())
        st.update(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                  preemptions=self.scheduler.num_preemptions, compiles=len(self.runner.compile_log),
                  compiles_while_serving=self.runner.guard.while_serving,
                  graph_cache_hits=self.runner.cache.hits if self.runner.cache else 0,
                  padding_tokens=self.runner.padding_tokens, real_tokens=self.runner.real_tokens)
        return st
