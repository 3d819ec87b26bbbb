"""Qwen2 (and Qwen2.5): the Llama layer with a bias on q, k and v (never on o), usually a tied head.

config.json: with `use_sliding_window`, layers from `max_window_layers` on are sliding (transformers 5 writes
the result as `layer_types`, read first). llama.cpp writes GGUF architecture "qwen2", Q/K rows unpermuted.
"""
from __future__ import annotations

from typing import Any

from kiln.models import hf_config
from kiln.models.family import Family, GgufArch
from kiln.models.naming import LLAMA_CPP_BLOCK_NAMES, LLAMA_CPP_GLOBAL_NAMES, llama_layout
from kiln.models.spec import AttentionSpec, LayerSpec, MlpSpec, ModelError, ModelSpec


def layer_kinds(cfg: dict[str, Any]) -> list[str]:
    """"full_attention" or "sliding_attention" per layer, as transformers' Qwen2Config derives them."""
    n = int(cfg["num_hidden_layers"])
    kinds = cfg.get("layer_types")
    if kinds is None:
        sliding = cfg.get("use_sliding_window", False) and cfg.get("sliding_window") is not None
        first = int(cfg.get("max_window_layers", 28))
        kinds = ["sliding_attention" if sliding and i >= first else "full_attention" for i in range(n)]
    if len(kinds) != n or set(kinds) - {"full_attention", "sliding_attention"}:
        raise ModelError(f"layer_types {kinds} is not one of full_attention|sliding_attention per layer")
    return kinds


def spec_from_config(arch: str, cfg: dict[str, Any]) -> ModelSpec:
    rope = hf_config.rope(cfg)
    mlp = MlpSpec(int(cfg["intermediate_size"]), act=hf_config.activation(cfg))
    layers = tuple(LayerSpec(AttentionSpec(rope=rope, qkv_bias=True, **slide), mlp)
                   for slide in hf_config.window_fields(layer_kinds(cfg), cfg.get("sliding_window")))
    return ModelSpec(**hf_config.model_fields(arch, cfg), layers=layers)


FAMILY = Family(
    name="qwen2",
    architectures={"Qwen2ForCausalLM": "qwen2"},
    spec_from_config=spec_from_config,
    layout=llama_layout,
    gguf=(GgufArch("qwen2", "Qwen2ForCausalLM", "qwen2", permute_qk=False, block_names=LLAMA_CPP_BLOCK_NAMES,
                   global_names=LLAMA_CPP_GLOBAL_NAMES),),
)
