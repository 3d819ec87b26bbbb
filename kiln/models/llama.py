"""Llama and Mistral: pre-norm decoder layers, GQA attention with RoPE, a SiLU-gated MLP.

config.json: `attention_bias` puts a bias on q, k, v and o; `mlp_bias` on gate, up and down; Mistral's
`sliding_window` (v0.1) makes every layer sliding. llama.cpp writes both as GGUF architecture "llama", with
the Q/K rows of each head interleaved.
"""
from __future__ import annotations

from typing import Any

from kiln.models import hf_config
from kiln.models.family import Family, GgufArch
from kiln.models.naming import LLAMA_CPP_BLOCK_NAMES, LLAMA_CPP_GLOBAL_NAMES, llama_layout
from kiln.models.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec


def spec_from_config(arch: str, cfg: dict[str, Any]) -> ModelSpec:
    bias = bool(cfg.get("attention_bias", False))
    window = cfg.get("sliding_window") if arch == "MistralForCausalLM" else None   # HF Llama has no window
    attention = AttentionSpec(rope=hf_config.rope(cfg), kind="sliding" if window else "global",
                              window=int(window) if window else None, qkv_bias=bias, o_bias=bias)
    mlp = MlpSpec(int(cfg["intermediate_size"]), act=hf_config.activation(cfg),
                  bias=bool(cfg.get("mlp_bias", False)))
    layers = (LayerSpec(attention, mlp),) * int(cfg["num_hidden_layers"])
    return ModelSpec(**hf_config.model_fields(arch, cfg), layers=layers)


FAMILY = Family(
    name="llama",
    architectures={"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"},
    spec_from_config=spec_from_config,
    layout=llama_layout,
    gguf=(GgufArch("llama", "LlamaForCausalLM", "llama", permute_qk=True, block_names=LLAMA_CPP_BLOCK_NAMES,
                   global_names=LLAMA_CPP_GLOBAL_NAMES),),
)
