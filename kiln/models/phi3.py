"""Phi-3 (and Phi-4-mini): the Llama layer with fused checkpoint projections (`qkv_proj`, `gate_up_proj`), an
optional sliding window, and partial rotary embeddings (`partial_rotary_factor`: only the first
head_dim * factor dims of each q/k head rotate).

Partial rotary is done in the layout, so no backend needs to know it: the q/k rows of each head are permuted so
that the rotated pairs (i, i + r/2) sit at (i, i + Dh/2) and the pass-through dims fill the rest, where
kernels/rope.inv_frequencies gives frequency 0 (q.k is unchanged by permuting both alike). `longrope`
(Phi-3 128k) is refused by name. llama.cpp writes GGUF "phi3" with the same fused tensors.
"""
from __future__ import annotations

from typing import Any

from kiln.models import hf_config
from kiln.models.family import Family, GgufArch
from kiln.models.layout import Fused, Layout, fused
from kiln.models.naming import LLAMA_CPP_GLOBAL_NAMES
from kiln.models.spec import AttentionSpec, LayerSpec, MlpSpec, ModelError, ModelSpec, RopeSpec

PHI3_CPP_BLOCK_NAMES = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
                        "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj",
                        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def spec_from_config(arch: str, cfg: dict[str, Any]) -> ModelSpec:
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    rs = cfg.get("rope_scaling") or {}
    if "longrope" in (rs.get("rope_type"), rs.get("type"), params.get("rope_type")):
        raise ModelError(f"{arch}: rope_scaling type 'longrope' is not supported")
    fields = hf_config.model_fields(arch, cfg)
    Dh = fields["head_dim"]
    factor = float(cfg.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)
    rot = int(Dh * factor)
    if rot % 2 or (Dh - rot) % 2:
        raise ModelError(f"{arch}: partial_rotary_factor {factor} gives {rot} of {Dh} rotary dims; need even")
    base = hf_config.rope(cfg)
    rope = RopeSpec(base.theta, base.scaling, rot if rot < Dh else None)
    window = cfg.get("sliding_window")
    attention = AttentionSpec(rope=rope, kind="sliding" if window else "global", window=int(window) if window else None)
    mlp = MlpSpec(int(cfg["intermediate_size"]), act=hf_config.activation(cfg))
    return ModelSpec(**fields, layers=(LayerSpec(attention, mlp),) * int(cfg["num_hidden_layers"]))


def rotary_perm(head_dim: int, rotary_dim: int) -> list[int]:
    """Row order within a head: kiln dim i holds checkpoint dim perm[i] (rotated halves at 0 and Dh/2)."""
    rh, rest = rotary_dim // 2, list(range(rotary_dim, head_dim))
    return [*range(rh), *rest[:len(rest) // 2], *range(rh, rotary_dim), *rest[len(rest) // 2:]]


def layout(spec: ModelSpec) -> Layout:
    D, V, Dh, H, KVH = spec.hidden_size, spec.vocab_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    g = {"embed": fused(("model.embed_tokens.weight", (V, D))), "final_norm": fused(("model.norm.weight", (D,)))}
    if not spec.tie_word_embeddings:
        g["head"] = fused(("lm_head.weight", (V, D)))
    layers = []
    for i, ls in enumerate(spec.layers):
        rot, F = ls.attention.rope.rotary_dim, ls.mlp.intermediate_size
        perm = None
        if rot is not None:
            head = rotary_perm(Dh, rot)
            perm = tuple([h * Dh + j for h in range(H + KVH) for j in head] + list(range((H + KVH) * Dh, (H + 2 * KVH) * Dh)))
        n = f"model.layers.{i}."
        layers.append({
            "attn_norm": fused((n + "input_layernorm.weight", (D,))),
            "qkv": Fused((n + "self_attn.qkv_proj.weight",), (((H + 2 * KVH) * Dh, D),), perm),
            "o": fused((n + "self_attn.o_proj.weight", (D, H * Dh))),
            "mlp_norm": fused((n + "post_attention_layernorm.weight", (D,))),
            "gate_up": fused((n + "mlp.gate_up_proj.weight", (2 * F, D))),
            "down": fused((n + "mlp.down_proj.weight", (D, F))),
        })
    return Layout(g, tuple(layers))


def _gguf_config(get, cfg: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's rope.dimension_count is the rotary width: head_dim is hidden / heads."""
    Dh = cfg["hidden_size"] // cfg["num_attention_heads"]
    rot = get("rope.dimension_count") or Dh
    return {"head_dim": Dh, "partial_rotary_factor": int(rot) / Dh,
            "sliding_window": get("attention.sliding_window")}


FAMILY = Family(
    name="phi3",
    architectures={"Phi3ForCausalLM": "phi3"},
    spec_from_config=spec_from_config,
    layout=layout,
    gguf=(GgufArch("phi3", "Phi3ForCausalLM", "phi3", permute_qk=False, block_names=PHI3_CPP_BLOCK_NAMES,
                   global_names=LLAMA_CPP_GLOBAL_NAMES, config=_gguf_config),),
)
