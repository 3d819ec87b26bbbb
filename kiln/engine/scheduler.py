"""FCFS continuous batching under one rule: every request's computed tokens catch up with its tokens.

A request with exactly one token to compute needs decode; one with more needs prefill (a new prompt, a later
chunk of a long one, or a preempted request recomputing). Each step, as vLLM v1 does:
  1. the running decodes, one token each (when a block runs out, the newest running request is preempted:
     blocks freed, recomputed later);
  2. the rest of the token budget (`max_num_batched_tokens` minus the decodes) filled with prefill chunks:
     running partial prefills first, then FCFS admission while `max_num_seqs` and free blocks allow (a
     prefix-cache hit starts a request past its cached blocks; nothing is admitted in a step that preempted).
A chunk is capped by `long_prefill_token_threshold` when set (several long prompts share a step and none
takes the whole budget), and the prefill rows' padded bucket (rows x longest chunk, compile/buckets) stays
within the budget, so a compiled backend has a graph for them. A step with both is kind "mixed"; one with only
decodes "decode", only prefill chunks "prefill" (the graph families a compiled backend already has).
"""
from __future__ import annotations

from collections import deque

from kiln.cache.kv_manager import KVCacheManager
from kiln.config import EngineConfig
from kiln.engine.request import Request, Status
from kiln.engine.scheduler_output import ScheduledRow, SchedulerOutput
from kiln.engine.speculative import with_drafts


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.kv = KVCacheManager(config.cache.num_blocks, config.cache.block_size,
                                 enable_prefix_caching=config.cache.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue ------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish(self, request_id: str, reason: str, stop_reason=None) -> Request | None:
        """Finish (or abort) a request at any time; frees its blocks at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(request_id)
        req.status, req.finish_reason, req.stop_reason = Status.FINISHED, reason, stop_reason
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput | None:
        decodes, preempted = self._schedule_decode()
        budget = self.config.scheduler.max_num_batched_tokens - sum(len(r.token_ids) for r in decodes)
        prefills = self._schedule_prefill(budget, admit=not preempted)
        if not decodes and not prefills:
            return None
        kind = "mixed" if decodes and prefills else "decode" if decodes else "prefill"
        return SchedulerOutput(kind, decodes + prefills, preempted)

    def _row(self, req: Request, num_new: int) -> ScheduledRow:
        start = req.num_computed_tokens
        sp = req.sampling_params
        penalties = sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0
        return ScheduledRow(
            request_id=req.request_id, token_ids=req.all_token_ids[start:start + num_new], start_pos=start,
            block_table=self.kv.block_table(req.request_id), sample=start + num_new == req.num_tokens,
            sampling_params=sp, seed=req.seed, output_index=len(req.output_token_ids),
            prompt_len=len(req.prompt_token_ids), history=req.all_token_ids if penalties else [],
            eos_token_ids=req.eos_token_ids, pooling=req.pooling)

    def _schedule_decode(self) -> tuple[list[ScheduledRow], list[str]]:
        """The running decodes, one token each, preempting the newest running request on block shortage."""
        rows: list[ScheduledRow] = []
        preempted: list[str] = []
        max_rows = self.config.buckets.decode_bs[-1]
        for req in list(self.running):
            if req.status is not Status.RUNNING or req.num_tokens - req.num_computed_tokens != 1:
                continue
            if len(rows) == max_rows:
                break
            if req.draft_token_ids and not self.kv.allocate_slots(req.request_id,
                                                                  req.num_tokens + len(req.draft_token_ids)):
                req.draft_token_ids = []               # no free block for the drafts: decode without them
            while not self.kv.allocate_slots(req.request_id, req.num_tokens):
                victim = self.running[-1]
                preempted.append(victim.request_id)
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is Status.RUNNING:
                rows.append(with_drafts(self._row(req, 1), req.draft_token_ids))
        rows = [r for r in rows if r.request_id not in preempted]
        return rows, preempted

    def _schedule_prefill(self, budget: int, admit: bool) -> list[ScheduledRow]:
        """Prefill chunks of at most `budget` real tokens in all: running partial prefills, then admissions."""
        plan = self.config.buckets
        threshold = self.config.scheduler.long_prefill_token_threshold
        max_rows = plan.prompt_bs[-1]
        rows: list[ScheduledRow] = []
        longest, used = 0, 0

        def chunk_for(req: Request) -> int:
            cap = plan.max_prefill_seq(len(rows) + 1)    # the padded bucket stays within the token budget
            cap = min(cap, budget - used, threshold or cap)
            return 0 if longest > cap else max(min(req.num_tokens - req.num_computed_tokens, cap), 0)

        def add(req: Request, n: int) -> None:
            nonlocal longest, used
            rows.append(self._row(req, n))
            longest, used = max(longest, n), used + n

        for req in [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]:
            n = chunk_for(req)
            if len(rows) == max_rows or n == 0:
                break
            if not self.kv.allocate_slots(req.request_id, req.num_computed_tokens + n):
                break
            add(req, n)
        while admit and self.waiting and len(rows) < max_rows \
                and len(self.running) < self.config.scheduler.max_num_seqs:
            req = self.waiting[0]
            blocks, cached = self.kv.get_computed_blocks(req.request_id, req.all_token_ids) \
                if req.sampling_params.prompt_logprobs is None and req.pooling is None \
                else ([], 0)   # prompt logprobs and embeddings: compute every position
            req.num_computed_tokens = cached
            n = chunk_for(req)
            if n == 0 or not self.kv.allocate_slots(req.request_id, cached + n, blocks):
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = cached
            req.status = Status.RUNNING
            self.running.append(req)
            add(req, n)
        return rows

    def _preempt(self, req: Request) -> None:
        """Free the newest running request's blocks; it goes back to the head of the queue to recompute."""
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status, req.num_computed_tokens = Status.WAITING, 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- results ----------------------------------------------------------------------------------
    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance computed counts and register newly full blocks for prefix caching."""
        for row in out.rows:
            req = self.requests.get(row.request_id)
            if req is None or req.status is not Status.RUNNING:
                continue
            req.num_computed_tokens = row.start_pos + len(row.token_ids) - row.num_draft  # + accepted drafts:
                                                                      # the engine, once it knows them
            self.kv.cache_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
