"""The asyncio face of the engine, for the gRPC server and the batch runner.

    caller (event loop)                           engine thread
    generate(prompt, params) ── validate ──> inbox ──> add_request
        ^ async iterator of RequestOutput              step() ── device call ── outputs
        └──────── per-request asyncio.Queue <── call_soon_threadsafe ──┘
    cancel / disconnect ──> abort ──> inbox ──> engine.abort (blocks freed at the next loop turn)

One thread owns the LLMEngine and runs steps back to back while there is work; everything else talks to it
through the inbox, so the scheduler and block pool are never touched from two threads.

Errors reach the streams they concern: a ValueError for a request the engine refuses, a StepError for each
request a step failed (the others keep streaming), and EngineDeadError for every pending and later request once
the engine thread stops on an error (then `error` is set and `on_death` is called once) or is shut down.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import numbers
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any, Callable

from kiln.engine.errors import EngineDeadError, StepError
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "StepError"]   # the servers import the errors from here


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_death: Callable[[BaseException], None] | None = None):
        """`on_death(error)` is called once, from the engine thread, if the engine stops on an error (before the
        pending streams are failed, so it should not block on them)."""
        self.engine = engine
        self.on_death = on_death
        self.tokenizer = engine.tokenizer
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], ...]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._closed: EngineDeadError | None = None     # what new requests get once the thread has stopped
        self._stats: dict[str, float] = {}
        self._refresh_stats()
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        """Why the engine stopped serving, or None while it is alive."""
        return self._error

    @property
    def num_pending(self) -> int:
        """Requests accepted and not yet finished (waiting or running)."""
        return len(self._streams)

    def stats(self) -> dict[str, float]:
        """The engine's counters as of its last step (safe to read from any thread)."""
        return dict(self._stats)

    def encode(self, prompt: str | list[int] | list[dict[str, str]]) -> tuple[str | None, list[int]]:
        """Text, token ids or chat messages -> (text, token ids). ValueError for ids that are not integers."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return None, self.tokenizer.apply_chat_template(prompt)
        return None, _token_ids(prompt)

    async def generate(self, prompt: str | list[int] | list[dict[str, str]], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's cumulative outputs as steps produce them; the last one has finished=True.

        Raises ValueError (before the first output) for input the engine cannot serve, StepError if the engine
        failed this request (it goes on serving others) and EngineDeadError once the engine has stopped.
        Cancelling the iteration (client gone, deadline) aborts the request and frees its blocks.
        """
        self._check_alive()
        params = params or SamplingParams()
        text, ids = self.encode(prompt)
        self.engine.validate(ids, params)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._streams:
            raise ValueError(f"request_id {rid!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._inbox.put((self._add, rid, text, ids, params))
        finished = False
        try:
            self._check_alive()   # the thread may have stopped before it saw this stream: it would never answer
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)
            self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self._inbox.put((self._abort, request_id))

    def shutdown(self) -> None:
        """Stop the engine thread; requests still pending fail with EngineDeadError."""
        self._stop.set()
        self._inbox.put((lambda: None,))
        self._thread.join(timeout=30)

    # -- engine thread ----------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._closed is not None:
            raise EngineDeadError(str(self._closed))

    def _add(self, rid: str, text: str | None, ids: list[int], params: SamplingParams) -> None:
        if rid not in self._streams:       # cancelled before it reached the engine
            return
        try:
            self.engine.add_request(ids, params, request_id=rid, prompt_text=text)
        except (ValueError, EngineDeadError) as e:
            self._deliver(rid, e)
        except Exception as e:  # noqa: BLE001 - a bug of ours, for this request only
            log.exception("adding request %s failed", rid)
            self.engine.discard(rid)
            self._deliver(rid, StepError({rid: e}))

    def _abort(self, rid: str) -> None:
        out = self.engine.abort(rid)
        if out is not None:
            self._refresh_stats()   # blocks freed now, not at the next step (there may be none)
            self._deliver(rid, out)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepError as e:      # these requests failed; the engine serves the rest
            for rid in e.request_ids:
                self._deliver(rid, e.for_request(rid))
            outputs = e.outputs
        for out in outputs:
            self._deliver(out.request_id, out)
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        try:
            self._stats = self.engine.stats()
        except Exception:  # noqa: BLE001 - counters are not worth the engine
            log.debug("engine.stats() failed; keeping the last counters", exc_info=True)

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(rid)
        if stream is None:
            return
        loop, q = stream
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:        # the caller's event loop is closed: nobody is listening any more
            self._streams.pop(rid, None)
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - a dead engine cannot abort; nothing is waiting on it
                log.debug("abort of %s failed", rid, exc_info=True)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished()
                try:
                    while True:
                        fn, *args = self._inbox.get(block=block, timeout=0.5 if block else None)
                        fn(*args)
                        block = False
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as e:  # the engine is broken: fail every stream instead of hanging them
            log.exception("engine thread died")
            self._closed = e if isinstance(e, EngineDeadError) else EngineDeadError(f"engine stopped: {e}")
            self._error = e
            if self.on_death is not None:   # first, so health has flipped before any client hears of it
                try:
                    self.on_death(e)
                except Exception:  # noqa: BLE001
                    log.exception("on_death callback failed")
            self._fail_streams()
            return
        self._closed = EngineDeadError("engine is shut down")
        self._fail_streams()

    def _fail_streams(self) -> None:
        """Every pending stream gets its own EngineDeadError (one exception object is raised in one task only)."""
        for rid in list(self._streams):
            self._deliver(rid, EngineDeadError(str(self._closed)))


def _token_ids(prompt: Any) -> list[int]:
    """A prompt given as token ids, as plain ints; ValueError for anything that is not an integer."""
    ids = []
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            shown = repr(t) if len(repr(t)) <= 40 else repr(t)[:37] + "..."
            raise ValueError(f"prompt_token_ids must hold integers (token ids), got {shown}")
        ids.append(int(t))
    return ids
