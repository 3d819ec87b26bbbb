"""Engines the Ray replica and Ray batch tests build inside their actors ("module:function" factories)."""
from __future__ import annotations

from tests.mock_engine import mock_engine


def slow_mock(step_seconds: float = 0.0, **kwargs):
    """A mock-backend LLMEngine whose steps take `step_seconds` (so a request can be caught in flight)."""
    eng = mock_engine(**kwargs)
    eng.runner.step_seconds = step_seconds
    return eng
