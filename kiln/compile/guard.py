"""The no-compile-while-serving guard: counts every XLA backend compile in the process, and forbids them
once armed (after warmup) unless lazy compiles were explicitly allowed.

It listens to JAX's own compile event, so it also catches compiles that do not go through kiln's runner
(a stray eager op, a shape that slipped past the buckets). The runner asks `check()` before it compiles.
"""
from __future__ import annotations

import logging
import threading

import jax

log = logging.getLogger(__name__)

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT


class CompileForbiddenError(RuntimeError):
    """A graph was needed that warmup did not build, and lazy compiles are not allowed."""


class CompileGuard:
    def __init__(self, allow_lazy: bool = False):
        self.allow_lazy = allow_lazy
        self.armed = False
        self.total = 0            # backend compiles seen since this guard was made
        self.while_serving = 0    # ... and since it was armed
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event != _COMPILE_EVENT:
            return
        with self._lock:
            self.total += 1
            if self.armed:
                self.while_serving += 1

    def arm(self) -> None:
        """Warmup is over: from now on every compile is an error (or a counted warning)."""
        self.armed = True

    def check(self, what: str) -> None:
        """Call before compiling `what` (a graph description)."""
        if not self.armed:
            return
        if not self.allow_lazy:
            raise CompileForbiddenError(f"{what} was not compiled during warmup and compiling while serving is "
                                        f"off; add its bucket to the plan (kiln warmup) or pass --allow-lazy-compile")
        log.warning("compiling %s while serving (lazy compile allowed)", what)

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)
