"""A spec's checkpoint tensors in kiln's layout, checked: the one entry both backends load weights through.

    src = source_tensors(spec, tensors)   # ModelError on a missing or mis-shaped tensor
    src.get("embed"), src.layer(i, "qkv") # float32 numpy, fused as models/layout.py describes
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from kiln.models import registry
from kiln.models.layout import SourceTensors, check
from kiln.models.spec import ModelSpec


def source_tensors(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> SourceTensors:
    return SourceTensors(registry.layout(spec), tensors)


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every checkpoint (HF-named) tensor the spec needs, with its shape ([out, in] for linear weights)."""
    return registry.layout(spec).expected_shapes()


def check_tensors(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> None:
    """Fail loudly on a missing or mis-shaped tensor; nothing is ever left random."""
    check(registry.layout(spec), tensors)
