"""The engine's exceptions, and what each one tells a caller.

    ValueError        the request is invalid: raised before it is queued, the message starts with the field name
                      (HTTP 400 with that `param`, gRPC INVALID_ARGUMENT, a batch line with status 400)
    StepError         the engine failed these requests (a step raised, or returned something unusable for them);
                      their blocks are freed and the engine goes on serving the others (HTTP 500, gRPC INTERNAL)
    EngineDeadError   the engine cannot go on (its runner failed step after step, or the scheduler broke):
                      every pending and later request fails with it (HTTP 500, gRPC INTERNAL, health NOT_SERVING)

Both of the latter are `EngineError`, a RuntimeError and never a ValueError, so no transport answers them as a
client's mistake; a transport may catch `EngineError` to answer both as an internal error.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class EngineError(RuntimeError):
    """The engine, not the request, is at fault."""


class StepError(EngineError):
    """The engine failed the requests in `causes` (parent request id -> the exception behind its failure).

    When `LLMEngine.step()` raises it, `outputs` holds the RequestOutputs the same step produced for the other
    requests, so nothing they gained is lost.
    """

    def __init__(self, causes: Mapping[str, BaseException], outputs: Sequence[Any] = ()):
        self.causes = dict(causes)
        self.request_ids: tuple[str, ...] = tuple(self.causes)
        self.cause = next(iter(self.causes.values()), None)
        self.outputs = list(outputs)
        what = f"{type(self.cause).__name__}: {self.cause}" if self.cause is not None else "unknown error"
        super().__init__(f"request {', '.join(self.request_ids)} failed in the engine ({what})")

    def for_request(self, request_id: str) -> StepError:
        """The failure as one request's stream sees it: its own cause, naming no other request."""
        return StepError({request_id: self.causes[request_id]})


class EngineDeadError(EngineError):
    """The engine stopped on an error it cannot recover from; no request can be served."""
