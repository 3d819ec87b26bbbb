"""Multi-host engines in lockstep: process 0 runs the whole engine (scheduler, KV manager, servers); every other
process runs only its runner, executing exactly the steps process 0 scheduled, in the same order.

    process 0   LLMEngine.step ─> LockstepRunner.execute(step) ─> broadcast(step) ─> runner.execute(step)
    process k   follow(runner): loop: step = broadcast() ─> runner.execute(step)         (same graphs, same
                                       None (shutdown) ─> return                          collectives)

Why this shape: a sharded graph over a global mesh only runs when every process calls it with the same global
shapes, so the followers must see the same SchedulerOutput; all other engine state (requests, tokens, blocks,
detokenizer) is host-side and deterministic from it, so only process 0 keeps it. The step travels as pickled
bytes through `jax.experimental.multihost_utils.broadcast_one_to_all`: the same runtime and network the model's
collectives use (gloo on CPU, ICI/DCN on TPU, NCCL on GPU), no second transport to configure or secure, and it
is a barrier as well. Two broadcasts a step: the payload's length, then the payload padded to a power of two
(each padded size compiles one tiny graph, once). Sampled tokens come back replicated on every process, so
followers compute them and drop them: cheaper than a second broadcast.
"""
from __future__ import annotations

import atexit
import logging
import pickle
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _broadcast_bytes(payload: bytes | None) -> bytes:
    """payload from process 0 to every process (others pass None)."""
    from jax.experimental import multihost_utils as mu
    n = np.array([len(payload) if payload is not None else 0], np.int64)
    n = int(mu.broadcast_one_to_all(n)[0])
    size = 1 << max(n - 1, 0).bit_length()
    buf = np.zeros(size, np.uint8)
    if payload is not None:
        buf[:n] = np.frombuffer(payload, np.uint8)
    return mu.broadcast_one_to_all(buf)[:n].tobytes()


def broadcast_step(step: Any | None, *, leader: bool) -> Any:
    """The leader's step (None = shutdown) on every process."""
    data = _broadcast_bytes(pickle.dumps(step) if leader else None)
    return pickle.loads(data)


class LockstepRunner:
    """Process 0's runner: every step is broadcast to the followers before it runs here. Everything else of
    the ModelRunner contract is the wrapped runner's."""

    def __init__(self, inner):
        self._inner = inner
        self._closed = False
        atexit.register(self.close)               # followers are released even if nobody closes us

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def execute(self, step):
        broadcast_step(step, leader=True)
        return self._inner.execute(step)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        broadcast_step(None, leader=True)         # releases the followers
        self._inner.close()


def follow(runner) -> int:
    """A follower's whole life: run the leader's steps until it shuts down. Returns the steps run."""
    n = 0
    while (step := broadcast_step(None, leader=False)) is not None:
        runner.execute(step)
        n += 1
    runner.close()
    log.info("leader shut down after %d steps", n)
    return n


def run_follower(model: str, **engine_kwargs) -> int:
    """A follower process (process_id > 0): build the same runner as process 0 (same flags), then follow."""
    from kiln.engine.build import build_runner
    _, _, runner = build_runner(model, **engine_kwargs)
    return follow(runner)
