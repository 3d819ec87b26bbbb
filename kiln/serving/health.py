"""Readiness, draining and engine death: one state per process, watched by every transport's health endpoint.

    STARTING ── engine built and warm ──> SERVING ── SIGTERM ──> DRAINING
        any state ── the engine thread dies (AsyncEngine on_death) ──> STOPPED   (the process exits non-zero)

Listeners (`watch`) are called on the event loop at every change, with `serving` true or false: the gRPC
server sets grpc.health.v1 for "" and kiln.v1.Inference, serve.py wakes up to exit on STOPPED. HTTP /health
reads `state` on each call.
"""
from __future__ import annotations

import enum
from typing import Callable

from kiln.serving.errors import Unavailable


class State(enum.Enum):
    STARTING = "warming up"
    SERVING = "ok"
    DRAINING = "draining"
    STOPPED = "engine stopped"


_WHY = {State.STARTING: "the engine is still warming up",
        State.DRAINING: "the server is draining (shutting down); retry on another replica",
        State.STOPPED: "the engine stopped"}


class Health:
    def __init__(self):
        self.state = State.STARTING
        self.reason = ""
        self._listeners: list[Callable[[State], None]] = []

    @property
    def serving(self) -> bool:
        return self.state is State.SERVING

    def watch(self, listener: Callable[[State], None]) -> None:
        self._listeners.append(listener)

    def set(self, state: State, reason: str = "") -> None:
        if self.state is State.STOPPED or state is self.state:   # a stopped engine stays stopped
            return
        self.state, self.reason = state, reason
        for listener in list(self._listeners):
            listener(state)

    def check(self) -> None:
        """Raise Unavailable unless serving."""
        if self.state is not State.SERVING:
            why = _WHY[self.state]
            raise Unavailable(f"{why}: {self.reason}" if self.reason else why)
