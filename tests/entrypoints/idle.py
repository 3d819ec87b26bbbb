"""Waiting for a server's engine to go idle: nothing pending and every KV block released."""
from __future__ import annotations

import time

from kiln.engine.async_engine import AsyncEngine


def wait_idle(engine: AsyncEngine, timeout: float = 30) -> dict:
    """The engine's stats once it is idle; fails the test if it is not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = engine.stats()
        if engine.num_pending == 0 and st["blocks_used"] == 0:
            return st
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.num_pending} pending, stats {engine.stats()}")
