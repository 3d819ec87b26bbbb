"""Backends by name: `--backend jax|torch` (and `mock` for tests) -> a ModelRunner class, imported lazily so
that a process loads only the framework it runs."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.backends.base import ModelRunner

RUNNERS = {
    "jax": "kiln.backends.jax.runner:JaxRunner",
    "torch": "kiln.backends.torch.runner:TorchRunner",
    "mock": "kiln.backends.mock:MockRunner",
}


def runner_class(name: str) -> type[ModelRunner]:
    if name not in RUNNERS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(RUNNERS)}")
    module, cls = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_runner(name: str, *, spec, config, tensors: dict[str, Any]) -> ModelRunner:
    return runner_class(name)(spec=spec, config=config, tensors=tensors)
