"""The Llama checkpoint naming, shared by the families that use it (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3):
HF names -> kiln's layout, and llama.cpp's GGUF names -> HF names.

HF: `model.embed_tokens`, `model.norm`, `lm_head`; layer i under `model.layers.{i}.`: `input_layernorm`,
`self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, each `.weight` / `.bias`;
with q/k norms `self_attn.{q,k}_norm`; sandwich layers (Gemma) name their four norms `input_layernorm`,
`post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`.
"""
from __future__ import annotations

from kiln.models.layout import Fused, Layout, fused
from kiln.models.spec import LayerSpec, ModelError, MlpSpec, ModelSpec

# llama.cpp tensor names (gguf-py's tensor_mapping) -> HF, for the Llama naming
LLAMA_CPP_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_CPP_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 2/3 (sandwich norms): llama.cpp's ffn_norm is the pre-feed-forward norm there
GEMMA_CPP_BLOCK_NAMES = {**LLAMA_CPP_BLOCK_NAMES, "post_attention_norm": "post_attention_layernorm",
                         "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


def llama_layout(spec: ModelSpec) -> Layout:
    """kiln tensor -> the HF tensors it fuses, for every tensor the spec needs."""
    D, V = spec.hidden_size, spec.vocab_size
    g = {"embed": fused(("model.embed_tokens.weight", (V, D))), "final_norm": fused(("model.norm.weight", (D,)))}
    if not spec.tie_word_embeddings:
        g["head"] = fused(("lm_head.weight", (V, D)))
    return Layout(g, tuple(_layer(spec, i, l) for i, l in enumerate(spec.layers)))


def _layer(spec: ModelSpec, i: int, layer: LayerSpec) -> dict[str, Fused]:
    if not isinstance(layer.mlp, MlpSpec):
        raise ModelError(f"{spec.architecture}: the Llama naming has no {type(layer.mlp).__name__} tensors")
    D, F, Dh = spec.hidden_size, layer.mlp.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * Dh, spec.num_kv_heads * Dh
    a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    qkv = ((a + "q_proj", q), (a + "k_proj", kv), (a + "v_proj", kv))
    gate_up = ((m + "gate_proj", F), (m + "up_proj", F))
    out = {
        "attn_norm": fused((f"model.layers.{i}.input_layernorm.weight", (D,))),
        "qkv": fused(*((n + ".weight", (rows, D)) for n, rows in qkv)),
        "o": fused((a + "o_proj.weight", (D, q))),
        "mlp_norm": fused((f"model.layers.{i}.post_attention_layernorm.weight", (D,))),
        "gate_up": fused(*((n + ".weight", (rows, D)) for n, rows in gate_up)),
        "down": fused((m + "down_proj.weight", (D, F))),
    }
    if layer.norms == "sandwich":
        n = f"model.layers.{i}."
        out["post_attn_norm"] = fused((n + "post_attention_layernorm.weight", (D,)))
        out["mlp_norm"] = fused((n + "pre_feedforward_layernorm.weight", (D,)))
        out["post_mlp_norm"] = fused((n + "post_feedforward_layernorm.weight", (D,)))
    elif layer.norms != "pre":
        raise ModelError(f"{spec.architecture}: the Llama naming has no {layer.norms}-norm layers")
    if layer.attention.qk_norm:
        out["q_norm"] = fused((a + "q_norm.weight", (Dh,)))
        out["k_norm"] = fused((a + "k_norm.weight", (Dh,)))
    if layer.attention.qkv_bias:
        out["qkv_bias"] = fused(*((n + ".bias", (rows,)) for n, rows in qkv))
    if layer.attention.o_bias:
        out["o_bias"] = fused((a + "o_proj.bias", (D,)))
    if layer.mlp.bias:
        out["gate_up_bias"] = fused(*((n + ".bias", (rows,)) for n, rows in gate_up))
        out["down_bias"] = fused((m + "down_proj.bias", (D,)))
    return out
