"""The requests this server is streaming now: client request id -> the engine requests behind it.

A completions request with several prompts runs one engine request per prompt (`<id>-<i>`); Abort by the
client's id stops all of them. Draining waits until this is empty.
"""
from __future__ import annotations

import asyncio
import time

from kiln.serving.errors import Conflict


class InFlight:
    def __init__(self):
        self._requests: dict[str, list[str]] = {}

    def add(self, request_id: str, engine_ids: list[str]) -> None:
        if request_id in self._requests:
            raise Conflict(f"request_id {request_id!r} is already in use")
        self._requests[request_id] = engine_ids

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def engine_ids(self, request_id: str) -> list[str]:
        return list(self._requests.get(request_id, ()))

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def ids(self) -> list[str]:
        return list(self._requests)

    async def wait_empty(self, seconds: float) -> bool:
        """Wait up to `seconds` for every request to end; True if they did."""
        deadline = time.monotonic() + seconds
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._requests
