"""AsyncEngines over the mock engine (tests/mock_engine.py) for the serving and server tests.

Until LLMEngine.stats() reads the ModelRunner contract's `stats()` (the backend branch), it reads a JaxRunner's
own counters; `_legacy_counters` gives the MockRunner those, from its RunnerStats, only where they are missing."""
from __future__ import annotations

import types

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.llm_engine import LLMEngine
from tests.mock_engine import mock_engine


class EngineKilled(BaseException):
    """Raised by an injected runner fault: an error the engine thread cannot recover from (not an Exception)."""


def _legacy_counters(engine: LLMEngine) -> LLMEngine:
    r = engine.runner
    if not hasattr(r, "compile_log"):
        r.compile_log, r.cache = [], None
        r.guard = types.SimpleNamespace(while_serving=0)
        cls = type(r)
        if not hasattr(cls, "padding_tokens"):
            cls.padding_tokens = property(lambda self: self._stats.padding_tokens)
            cls.real_tokens = property(lambda self: self._stats.real_tokens)
    return engine


def mock_llm_engine(**kwargs) -> LLMEngine:
    return _legacy_counters(mock_engine(**kwargs))


def mock_async_engine(on_death=None, **kwargs) -> AsyncEngine:
    """An AsyncEngine on the mock engine; kwargs are EngineConfig.create's (max_num_seqs, max_model_len, ...)."""
    return AsyncEngine(mock_llm_engine(**kwargs), on_death=on_death)


def kill_engine(engine: AsyncEngine | LLMEngine) -> None:
    """Make the next step raise EngineKilled: the engine thread stops and calls on_death."""
    def fault(step):
        raise EngineKilled("injected: the device is gone")
    (engine.engine if isinstance(engine, AsyncEngine) else engine).runner.fault = fault
