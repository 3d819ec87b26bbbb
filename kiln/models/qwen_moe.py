"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 attention (q/k/v bias, resp. q/k norms) with a mixture of
SiLU-gated experts: softmax router, top `num_experts_per_tok` of `num_experts`, renormalised only when
`norm_topk_prob`; Qwen2-MoE adds an always-on shared expert scaled by sigmoid(shared_expert_gate(x)).

config.json: a layer is sparse when it is not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0;
models mixing dense and sparse layers are refused ("layers of different structure"). llama.cpp writes GGUF
architectures "qwen2moe" / "qwen3moe": every layer sparse, experts stacked into `ffn_{gate,up,down}_exps`
[n_expert, ...], the shared expert as `ffn_*_shexp` + `ffn_gate_inp_shexp`; its kernels renormalise the top-k
weights for qwen3moe and not for qwen2moe (`expert_weights_norm` is not written), as transformers assumes too.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from kiln.models import hf_config
from kiln.models.family import Family, GgufArch
from kiln.models.naming import LLAMA_CPP_GLOBAL_NAMES, QWEN_MOE, QWEN_MOE_CPP_BLOCK_NAMES, llama_layout
from kiln.models.qwen2 import layer_kinds
from kiln.models.spec import AttentionSpec, LayerSpec, MlpSpec, ModelSpec, MoeSpec


def spec_from_config(arch: str, cfg: dict[str, Any]) -> ModelSpec:
    qwen3 = arch == "Qwen3MoeForCausalLM"
    rope, act = hf_config.rope(cfg), hf_config.activation(cfg)
    bias = bool(cfg.get("attention_bias", False)) if qwen3 else bool(cfg.get("qkv_bias", True))
    shared = None if qwen3 else int(cfg["shared_expert_intermediate_size"])
    moe = MoeSpec(num_experts=int(cfg.get("num_experts") or cfg["num_local_experts"]),
                  top_k=int(cfg["num_experts_per_tok"]),
                  intermediate_size=int(cfg["moe_intermediate_size"]),
                  norm_topk=bool(cfg.get("norm_topk_prob", False)), shared_expert_size=shared, act=act)
    dense = MlpSpec(int(cfg["intermediate_size"]), act=act)
    step, only = int(cfg.get("decoder_sparse_step", 1)), set(cfg.get("mlp_only_layers") or [])
    slides = hf_config.window_fields(layer_kinds(cfg), cfg.get("sliding_window"))

    def layer(i: int, slide: dict[str, Any]) -> LayerSpec:
        attention = AttentionSpec(rope=rope, qkv_bias=bias, o_bias=bias and qwen3, qk_norm=qwen3, **slide)
        sparse = i not in only and (i + 1) % step == 0
        return LayerSpec(attention, moe if sparse else dense)

    return ModelSpec(**hf_config.model_fields(arch, cfg), layers=tuple(layer(i, s) for i, s in enumerate(slides)))


def _gguf_config(qwen3: bool):
    """GGUF metadata -> the Qwen-MoE config.json fields (gguf_loader._config has set the common ones)."""
    def config(get, cfg: dict[str, Any]) -> dict[str, Any]:
        out = {"num_experts": int(get("expert_count")), "num_experts_per_tok": int(get("expert_used_count")),
               "moe_intermediate_size": int(get("expert_feed_forward_length")), "norm_topk_prob": qwen3}
        if not qwen3:
            out["qkv_bias"] = cfg["attention_bias"]
            out["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))
        return out
    return config


FAMILY = Family(
    name="qwen_moe",
    architectures={"Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe"},
    spec_from_config=spec_from_config,
    layout=partial(llama_layout, moe=QWEN_MOE),
    gguf=tuple(GgufArch(name, arch, mt, permute_qk=False, block_names=QWEN_MOE_CPP_BLOCK_NAMES,
                        global_names=LLAMA_CPP_GLOBAL_NAMES, config=_gguf_config(name == "qwen3moe"))
               for name, arch, mt in (("qwen2moe", "Qwen2MoeForCausalLM", "qwen2_moe"),
                                      ("qwen3moe", "Qwen3MoeForCausalLM", "qwen3_moe"))),
)
