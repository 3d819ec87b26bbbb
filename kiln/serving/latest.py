"""A bounded hand-off between producers that must never wait and one consumer that may: the latest value per key.

Engine outputs are cumulative (every sample's whole text and tokens so far), so a stream that falls behind loses
nothing by skipping to the newest one: the transport's delta tracker sends everything new since its last
message. Producers (one pump per engine request) `put` without waiting; a newer value replaces an unread one,
so a stalled consumer holds at most one value per key, never a growing queue.

    producer:  put(key, value) ... done()       or  fail(error) ... done()
    consumer:  while (items := await take()) is not None:  {key: latest value} in key order
               raises the first error once the values that came before it are taken
"""
from __future__ import annotations

import asyncio
from typing import Any


class Latest:
    def __init__(self, producers: int):
        self._items: dict[Any, Any] = {}
        self._error: BaseException | None = None
        self._open = producers
        self._wake = asyncio.Event()

    def put(self, key: Any, value: Any) -> None:
        self._items[key] = value
        self._wake.set()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake.set()

    def done(self) -> None:
        """One producer has ended (after its last put or its fail)."""
        self._open -= 1
        self._wake.set()

    @property
    def open(self) -> int:
        """Producers that have not ended."""
        return self._open

    async def take(self) -> dict[Any, Any] | None:
        """The latest value of every key put since the last take (key order), waiting for one; None once every
        producer has ended and nothing is left; raises the first failure after what was put before it."""
        while True:
            if self._items:
                items, self._items = dict(sorted(self._items.items())), {}
                return items
            if self._error is not None:
                raise self._error
            if self._open <= 0:
                return None
            self._wake.clear()
            await self._wake.wait()
