"""AsyncEngines over the mock engine (tests/mock_engine.py) for the serving and server tests."""
from __future__ import annotations

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.llm_engine import LLMEngine
from tests.mock_engine import mock_engine


class EngineKilled(BaseException):
    """Raised by an injected runner fault: an error the engine thread cannot recover from (not an Exception)."""


def mock_llm_engine(**kwargs) -> LLMEngine:
    return mock_engine(**kwargs)


def mock_async_engine(on_death=None, **kwargs) -> AsyncEngine:
    """An AsyncEngine on the mock engine; kwargs are engine/build.build_config's (max_num_seqs, max_model_len, ...)."""
    return AsyncEngine(mock_llm_engine(**kwargs), on_death=on_death)


def kill_engine(engine: AsyncEngine | LLMEngine) -> None:
    """Make the next step raise EngineKilled: the engine thread stops and calls on_death."""
    def fault(step):
        raise EngineKilled("injected: the device is gone")
    (engine.engine if isinstance(engine, AsyncEngine) else engine).runner.fault = fault
