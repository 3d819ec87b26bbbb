"""Admission: decided the moment a request arrives, in slots, one slot per sequence it will run.

    capacity = max_num_seqs (the running batch) + max_queued (allowed to wait beyond it)
    a request of P prompts with n samples each needs P * n slots
    arrival: used + slots > capacity ─> Overloaded; else used += slots (before any await)
    the request ends (finished, failed, cancelled) ─> its slots are released

Slots are taken synchronously on the event loop thread, so a burst of concurrent requests is counted one by
one and exactly `capacity` slots' worth gets in; nothing is counted late (when a request starts running).
"""
from __future__ import annotations

from kiln.serving.errors import InvalidRequest, Overloaded


class Slots:
    """The slots of one admitted request; `release()` is idempotent."""

    def __init__(self, admission: "Admission", count: int):
        self._admission, self.count = admission, count

    def release(self) -> None:
        if self._admission is not None:
            self._admission.used -= self.count
            self._admission = None


class Admission:
    def __init__(self, max_running: int, max_queued: int | None):
        """`max_queued` None: no limit (batch jobs bound themselves)."""
        self.max_running, self.max_queued = max_running, max_queued
        self.used = 0

    @property
    def capacity(self) -> int | None:
        return None if self.max_queued is None else self.max_running + self.max_queued

    def acquire(self, slots: int) -> Slots:
        """Take `slots` now or raise Overloaded (InvalidRequest if the request could never fit)."""
        cap = self.capacity
        if cap is not None:
            if slots > cap:
                raise InvalidRequest(f"n is {slots} sequences for this request (prompts x n); this server admits "
                                     f"at most {cap} (max_num_seqs {self.max_running} + --max-queued "
                                     f"{self.max_queued})", "n")
            if self.used + slots > cap:
                raise Overloaded(f"server is at capacity: {self.used} sequences admitted, this request needs "
                                 f"{slots}; max_num_seqs is {self.max_running} and --max-queued is "
                                 f"{self.max_queued}; retry later")
        self.used += slots
        return Slots(self, slots)
