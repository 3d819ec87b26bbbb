"""What one architecture family provides to the registry: a `Family` value, defined in its models/<family>.py.

A family reads its `config.json` into a ModelSpec, names its checkpoint tensors in kiln's layout
(models/layout.py) and, where llama.cpp writes it, says how its GGUF files map onto the same checkpoint names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from kiln.models.layout import Layout
from kiln.models.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """A GGUF `general.architecture` value and how its files load: as `architecture` (an HF name of the family),
    with tensors renamed by `tensor_names` (llama.cpp block tensor -> HF name inside `model.layers.N.`, plus
    whole-model names) and, where `permute_qk`, Q/K rows un-interleaved (llama.cpp's convert_hf_to_gguf
    permutes them for the rotary layout of its llama kernels)."""
    name: str
    architecture: str
    model_type: str
    permute_qk: bool
    block_names: Mapping[str, str]      # "attn_q" -> "self_attn.q_proj"
    global_names: Mapping[str, str]     # "token_embd.weight" -> "model.embed_tokens.weight"
    norm_shift: float = 0.0             # subtracted from every norm weight (llama.cpp stores Gemma's 1 + w)
    # GGUF metadata -> the config.json fields this architecture adds to the common ones (gguf_loader._config)
    config: Callable[[Callable[[str, Any], Any], dict[str, Any]], dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architectures: Mapping[str, str]                        # HF architecture -> its config `model_type`
    spec_from_config: Callable[[str, dict[str, Any]], ModelSpec]   # (architecture, config.json) -> spec
    layout: Callable[[ModelSpec], Layout]                   # spec -> kiln tensors named by checkpoint tensors
    gguf: tuple[GgufArch, ...] = ()
