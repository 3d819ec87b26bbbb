"""Mixtral: the Mistral layer with a mixture of SiLU-gated experts in place of the MLP; a router's softmax picks
the top `num_experts_per_tok` of `num_local_experts` per token and their weights are renormalised to sum to 1.

config.json: `sliding_window` makes every layer sliding, as Mistral v0.1. Checkpoint names: the experts live
under `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down), the router is `block_sparse_moe.gate`.
llama.cpp writes Mixtral as GGUF architecture "llama" (Q/K rows interleaved) with `llama.expert_count` /
`llama.expert_used_count` and each layer's experts stacked into `ffn_{gate,up,down}_exps` [n_expert, ...]; the
loader picks this entry ("llama+experts") over plain Llama when the expert count is there.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from kiln.models import hf_config
from kiln.models.family import Family, GgufArch
from kiln.models.naming import LLAMA_CPP_GLOBAL_NAMES, MIXTRAL_CPP_BLOCK_NAMES, MIXTRAL_MOE, llama_layout
from kiln.models.spec import AttentionSpec, LayerSpec, ModelSpec, MoeSpec


def spec_from_config(arch: str, cfg: dict[str, Any]) -> ModelSpec:
    window = cfg.get("sliding_window")
    attention = AttentionSpec(rope=hf_config.rope(cfg), kind="sliding" if window else "global",
                              window=int(window) if window else None)
    moe = MoeSpec(num_experts=int(cfg["num_local_experts"]), top_k=int(cfg["num_experts_per_tok"]),
                  intermediate_size=int(cfg["intermediate_size"]), norm_topk=True, act=hf_config.activation(cfg))
    return ModelSpec(**hf_config.model_fields(arch, cfg), layers=(LayerSpec(attention, moe),) * int(cfg["num_hidden_layers"]))


FAMILY = Family(
    name="mixtral",
    architectures={"MixtralForCausalLM": "mixtral"},
    spec_from_config=spec_from_config,
    layout=partial(llama_layout, moe=MIXTRAL_MOE),
    gguf=(GgufArch("llama+experts", "MixtralForCausalLM", "mixtral", permute_qk=True,
                   block_names=MIXTRAL_CPP_BLOCK_NAMES, global_names=LLAMA_CPP_GLOBAL_NAMES,
                   config=lambda get, cfg: {"num_local_experts": int(get("expert_count")),
                                            "num_experts_per_tok": int(get("expert_used_count"))}),),
)
