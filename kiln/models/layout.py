"""kiln's weight layout: which tensors a model has in kiln's own naming, and which checkpoint tensors make each.

A family (models/llama.py, ...) names, for a spec, every kiln tensor as a `Fused`: checkpoint (HF-named) tensors
concatenated along their first axis, e.g. layer 3's "qkv" is q_proj | k_proj | v_proj, [out, in]. Backends read
only kiln names, through `SourceTensors` (models/tensors.py builds it from a spec), so no backend knows an HF or
GGUF name. The kiln names:

  model-wide   embed [V, D], final_norm [D], head [V, D] (absent when tied)
  per layer    attn_norm [D], qkv [(H + 2 KVH) Dh, D], qkv_bias, o [D, H Dh], o_bias,
               mlp_norm [D], gate_up [2F, D], gate_up_bias, down [D, F], down_bias
  to come      q_norm / k_norm [Dh], post_attn_norm / post_mlp_norm [D], router, experts_gate_up, ...
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from kiln.models.spec import ModelError


@dataclasses.dataclass(frozen=True)
class Fused:
    """One kiln tensor: these checkpoint tensors, with these shapes, concatenated along axis 0, then (where
    `perm` is given) its rows reordered: row r of the result is row perm[r] (Phi-3's partial rotary)."""
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(s[0] for s in self.shapes), *self.shapes[0][1:])


def fused(*parts: tuple[str, tuple[int, ...]]) -> Fused:
    """fused((name, shape), ...) -> Fused."""
    return Fused(tuple(n for n, _ in parts), tuple(tuple(s) for _, s in parts))


@dataclasses.dataclass(frozen=True)
class Layout:
    globals: Mapping[str, Fused]                # embed, final_norm, head
    layers: tuple[Mapping[str, Fused], ...]     # one mapping per layer: attn_norm, qkv, ...

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor the layout reads, with its shape."""
        out = {}
        for group in (self.globals, *self.layers):
            for f in group.values():
                out.update(zip(f.sources, f.shapes))
        return out


class SourceTensors:
    """Checkpoint tensors seen in kiln's layout: `get("embed")`, `layer(3, "qkv")` give float32 numpy arrays,
    fused on demand (one kiln tensor at a time, so loading never holds a second copy of the model)."""

    def __init__(self, layout: Layout, tensors: Mapping[str, np.ndarray]):
        check(layout, tensors)
        self.layout, self._tensors = layout, tensors

    def __contains__(self, name: str) -> bool:
        return name in self.layout.globals

    def has_layer(self, name: str) -> bool:
        """Whether every layer has kiln tensor `name` (backends stack per-layer tensors)."""
        return all(name in l for l in self.layout.layers)

    def get(self, name: str) -> np.ndarray:
        return self._fuse(self.layout.globals[name])

    def layer(self, i: int, name: str) -> np.ndarray:
        return self._fuse(self.layout.layers[i][name])

    def _fuse(self, f: Fused) -> np.ndarray:
        parts = [np.asarray(self._tensors[n], dtype=np.float32) for n in f.sources]
        w = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return w if f.perm is None else w[np.asarray(f.perm)]


def check(layout: Layout, tensors: Mapping[str, np.ndarray]) -> None:
    """Fail loudly on a missing or mis-shaped tensor; nothing is ever left random."""
    for name, shape in layout.expected_shapes().items():
        if name not in tensors:
            raise ModelError(f"weights are missing tensor {name} (expected shape {list(shape)})")
        if tuple(tensors[name].shape) != shape:
            raise ModelError(f"tensor {name} has shape {list(tensors[name].shape)}, "
                             f"expected {list(shape)} from the model config")
