"""The Llama checkpoint naming, shared by the families that use it (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3):
HF names -> kiln's layout, and llama.cpp's GGUF names -> HF names (MoE experts: one stacked tensor -> one HF
tensor per expert, at "{e}").

HF: `model.embed_tokens`, `model.norm`, `lm_head`; layer i under `model.layers.{i}.`: `input_layernorm`,
`self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, each `.weight` / `.bias`;
with q/k norms `self_attn.{q,k}_norm`; sandwich layers (Gemma) name their four norms `input_layernorm`,
`post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`.
"""
from __future__ import annotations

import dataclasses

from kiln.models.layout import Fused, Layout, fused
from kiln.models.spec import LayerSpec, ModelError, MlpSpec, ModelSpec, MoeSpec

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


@dataclasses.dataclass(frozen=True)
class MoeNames:
    """Where a family keeps its experts, under `model.layers.{i}.{block}`: the router, expert e's gate, up and
    down projections (`experts.{e}.{gate}`...), and the shared expert with its sigmoid gate (Qwen2-MoE)."""
    block: str = "mlp."
    router: str = "gate"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    shared: str = "shared_expert."
    shared_gate: str = "shared_expert_gate"


MIXTRAL_MOE = MoeNames(block="block_sparse_moe.", gate="w1", up="w3", down="w2")
QWEN_MOE = MoeNames()


# MoE (llama.cpp's MoE blocks): the router, the experts stacked into one 3-D tensor [n_expert, rows, cols] per
# projection (gguf_loader splits them at "{e}"), and Qwen2-MoE's shared expert with its sigmoid gate
def llama_cpp_moe_names(names: MoeNames) -> dict[str, str]:
    b, ex = names.block, f"{names.block}experts.{{e}}."
    return {"ffn_gate_inp": b + names.router, "ffn_gate_exps": ex + names.gate, "ffn_up_exps": ex + names.up,
            "ffn_down_exps": ex + names.down, "ffn_gate_shexp": b + names.shared + "gate_proj",
            "ffn_up_shexp": b + names.shared + "up_proj", "ffn_down_shexp": b + names.shared + "down_proj",
            "ffn_gate_inp_shexp": b + names.shared_gate}


MIXTRAL_CPP_BLOCK_NAMES = {**LLAMA_CPP_BLOCK_NAMES, **llama_cpp_moe_names(MIXTRAL_MOE)}
QWEN_MOE_CPP_BLOCK_NAMES = {**LLAMA_CPP_BLOCK_NAMES, **llama_cpp_moe_names(QWEN_MOE)}


def llama_layout(spec: ModelSpec, moe: MoeNames | None = None) -> Layout:
    """kiln tensor -> the HF tensors it fuses, for every tensor the spec needs."""
    D, V = spec.hidden_size, spec.vocab_size
    g = {"embed": fused(("model.embed_tokens.weight", (V, D))), "final_norm": fused(("model.norm.weight", (D,)))}
    if not spec.tie_word_embeddings:
        g["head"] = fused(("lm_head.weight", (V, D)))
    return Layout(g, tuple(_layer(spec, i, l, moe) for i, l in enumerate(spec.layers)))


def _moe(spec: ModelSpec, i: int, mlp: MoeSpec, names: MoeNames) -> dict[str, Fused]:
    """router [E, D]; experts_gate_up: every expert's gate | up, [E * 2F, D]; experts_down [E * D, F]; the
    shared expert as shared_gate_up / shared_down / shared_gate [1, D]."""
    D, F, E = spec.hidden_size, mlp.intermediate_size, mlp.num_experts
    b = f"model.layers.{i}.{names.block}"
    ex = lambda e, n: f"{b}experts.{e}.{n}.weight"
    out = {"router": fused((f"{b}{names.router}.weight", (E, D))),
           "experts_gate_up": fused(*((ex(e, n), (F, D)) for e in range(E) for n in (names.gate, names.up))),
           "experts_down": fused(*((ex(e, names.down), (D, F)) for e in range(E)))}
    if mlp.shared_expert_size:
        S, sh = mlp.shared_expert_size, b + names.shared
        out["shared_gate_up"] = fused((sh + "gate_proj.weight", (S, D)), (sh + "up_proj.weight", (S, D)))
        out["shared_down"] = fused((sh + "down_proj.weight", (D, S)))
        out["shared_gate"] = fused((f"{b}{names.shared_gate}.weight", (1, D)))
    return out


def _layer(spec: ModelSpec, i: int, layer: LayerSpec, moe: MoeNames | None) -> dict[str, Fused]:
    if not isinstance(layer.mlp, MlpSpec) and moe is None:
        raise ModelError(f"{spec.architecture}: the Llama naming has no {type(layer.mlp).__name__} tensors")
    D, Dh = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * Dh, spec.num_kv_heads * Dh
    a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    qkv = ((a + "q_proj", q), (a + "k_proj", kv), (a + "v_proj", kv))
    out = {
        "attn_norm": fused((f"model.layers.{i}.input_layernorm.weight", (D,))),
        "qkv": fused(*((n + ".weight", (rows, D)) for n, rows in qkv)),
        "o": fused((a + "o_proj.weight", (D, q))),
        "mlp_norm": fused((f"model.layers.{i}.post_attention_layernorm.weight", (D,))),
    }
    if isinstance(layer.mlp, MoeSpec):
        out.update(_moe(spec, i, layer.mlp, moe))
    else:
        F = layer.mlp.intermediate_size
        gate_up = ((m + "gate_proj", F), (m + "up_proj", F))
        out["gate_up"] = fused(*((n + ".weight", (rows, D)) for n, rows in gate_up))
        out["down"] = fused((m + "down_proj.weight", (D, F)))
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
    if isinstance(layer.mlp, MlpSpec) and layer.mlp.bias:
        out["gate_up_bias"] = fused(*((n + ".bias", (rows,)) for n, rows in gate_up))
        out["down_bias"] = fused((m + "down_proj.bias", (D,)))
    return out
