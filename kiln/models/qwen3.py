"""Qwen3: the Llama layer with an RMS norm over head_dim on q and k (before RoPE), no biases by default.

config.json: `attention_bias` puts a bias on q, k, v and o; sliding layers as Qwen2 derives them (`layer_types`,
else `use_sliding_window` + `max_window_layers`). llama.cpp writes GGUF architecture "qwen3", Q/K rows
unpermuted, the norms as `attn_q_norm` / `attn_k_norm`.
"""
from __future__ import annotations

from typing import Any

from kiln.models import hf_config
from kiln.models.family import Family, GgufArch
from kiln.models.naming import LLAMA_CPP_BLOCK_NAMES, LLAMA_CPP_GLOBAL_NAMES, llama_layout
from kiln.models.qwen2 import layer_kinds
from kiln.models.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec


def spec_from_config(arch: str, cfg: dict[str, Any]) -> ModelSpec:
    rope, bias = hf_config.rope(cfg), bool(cfg.get("attention_bias", False))
    mlp = MlpSpec(int(cfg["intermediate_size"]), act=hf_config.activation(cfg))
    layers = tuple(LayerSpec(AttentionSpec(rope=rope, qkv_bias=bias, o_bias=bias, qk_norm=True, **slide), mlp)
                   for slide in hf_config.window_fields(layer_kinds(cfg), cfg.get("sliding_window")))
    return ModelSpec(**hf_config.model_fields(arch, cfg), layers=layers)


FAMILY = Family(
    name="qwen3",
    architectures={"Qwen3ForCausalLM": "qwen3"},
    spec_from_config=spec_from_config,
    layout=llama_layout,
    gguf=(GgufArch("qwen3", "Qwen3ForCausalLM", "qwen3", permute_qk=False, block_names=LLAMA_CPP_BLOCK_NAMES,
                   global_names=LLAMA_CPP_GLOBAL_NAMES),),
)
