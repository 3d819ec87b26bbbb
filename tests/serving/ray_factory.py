"""Engines the Ray replica and Ray batch tests build inside their actors ("module:function" factories)."""
from __future__ import annotations

from tests.mock_engine import mock_engine


def slow_mock(step_seconds: float = 0.0, **kwargs):
    """A mock-backend LLMEngine whose steps take `step_seconds` (so a request can be caught in flight)."""
    eng = mock_engine(**kwargs)
    eng.runner.step_seconds = step_seconds
    return eng


def pid_mock(pid_dir: str, step_seconds: float = 0.0, **kwargs):
    """slow_mock that leaves a file named by its process id in `pid_dir` (tests kill an actor by it)."""
    import os
    from pathlib import Path
    (Path(pid_dir) / str(os.getpid())).touch()
    return slow_mock(step_seconds, **kwargs)
