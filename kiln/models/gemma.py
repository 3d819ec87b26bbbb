"""Gemma 2 and Gemma 3 (text): the Llama layer with sandwich norms, (1 + weight) RMS norms, a GELU-tanh gated
MLP, embeddings scaled by sqrt(hidden_size), scores scaled by query_pre_attn_scalar ** -0.5, and interleaved
local (sliding) and global layers.

Gemma 3 adds q/k norms and a RoPE per layer kind: transformers 5 writes `rope_parameters` as
{"sliding_attention": {...}, "full_attention": {...}}; transformers 4 wrote `rope_theta` + `rope_scaling` (global)
and `rope_local_base_freq` (local), and `sliding_window_pattern` instead of `layer_types`. Gemma 2 adds
attention and final logit soft-capping. llama.cpp writes GGUF "gemma3" / "gemma2" with the norm weights stored
as 1 + w (`norm_shift`), the local RoPE base fixed at 10000 and every 6th (Gemma 3) or 2nd (Gemma 2) layer
global.
"""
from __future__ import annotations

import math
from typing import Any

from kiln.models import hf_config
from kiln.models.family import Family, GgufArch
from kiln.models.naming import GEMMA_CPP_BLOCK_NAMES, LLAMA_CPP_GLOBAL_NAMES, llama_layout
from kiln.models.spec import AttentionSpec, LayerSpec, MlpSpec, ModelError, ModelSpec, NormSpec, RopeSpec

KINDS = ("sliding_attention", "full_attention")


def layer_kinds(arch: str, cfg: dict[str, Any]) -> list[str]:
    n = int(cfg["num_hidden_layers"])
    kinds = cfg.get("layer_types")
    if kinds is None:
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
                      or (6 if arch == "Gemma3ForCausalLM" else 2))
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if len(kinds) != n or set(kinds) - set(KINDS):
        raise ModelError(f"layer_types {kinds} is not one of full_attention|sliding_attention per layer")
    return list(kinds)


def ropes(arch: str, cfg: dict[str, Any]) -> dict[str, RopeSpec]:
    """The RoPE of each layer kind."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and set(params) & set(KINDS):
        missing = set(KINDS) - set(params)
        if missing:
            raise ModelError(f"rope_parameters has no entry for {', '.join(sorted(missing))}")
        return {kind: hf_config.rope({"rope_parameters": params[kind]}) for kind in KINDS}
    glob = hf_config.rope(cfg)
    if arch == "Gemma2ForCausalLM":
        return {kind: glob for kind in KINDS}
    return {"full_attention": glob, "sliding_attention": RopeSpec(float(cfg.get("rope_local_base_freq", 10000.0)))}


def spec_from_config(arch: str, cfg: dict[str, Any]) -> ModelSpec:
    if cfg.get("use_bidirectional_attention"):
        raise ModelError(f"{arch}: use_bidirectional_attention is not supported (kiln runs causal decoders)")
    gemma3 = arch == "Gemma3ForCausalLM"
    rope, kinds = ropes(arch, cfg), layer_kinds(arch, cfg)
    slides = hf_config.window_fields(kinds, cfg.get("sliding_window", 4096))      # transformers' default
    scale = float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 256) ** -0.5
    softcap = cfg.get("attn_logit_softcapping")
    bias = bool(cfg.get("attention_bias", False))
    mlp = MlpSpec(int(cfg["intermediate_size"]), act=hf_config.activation(cfg, "gelu_pytorch_tanh"))

    def attention(kind: str, slide: dict[str, Any]) -> AttentionSpec:
        return AttentionSpec(rope=rope[kind], qkv_bias=bias, o_bias=bias, qk_norm=gemma3, scale=scale,
                             logit_softcap=float(softcap) if softcap else None, **slide)

    fields = hf_config.model_fields(arch, cfg)
    fields["norm"] = NormSpec(fields["norm"].eps, "rms_plus_one")
    fields["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))
    final_cap = cfg.get("final_logit_softcapping")
    return ModelSpec(**fields, layers=tuple(LayerSpec(attention(k, s), mlp, norms="sandwich")
                                                   for k, s in zip(kinds, slides)),
                     embed_scale=math.sqrt(fields["hidden_size"]),
                     final_logit_softcap=float(final_cap) if final_cap else None)


def _gguf_config(every: int):
    def config(get, cfg: dict[str, Any]) -> dict[str, Any]:
        """The Gemma fields llama.cpp's metadata holds (or implies: its fixed local base and layer pattern)."""
        n, glob = cfg["num_hidden_layers"], {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
        rs = cfg.pop("rope_scaling", None)
        if rs:
            glob.update(rs)
        head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        out = {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": get("attention.sliding_window"),
               "layer_types": ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)],
               # llama.cpp: 1/sqrt(head_dim), except Gemma 2/3 27B (62 or 46 layers): hidden / heads
               "query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if n in (46, 62)
               else head_dim,
               "attn_logit_softcapping": get("attn_logit_softcapping"),
               "final_logit_softcapping": get("final_logit_softcapping")}
        if every == 6:
            out["rope_parameters"] = {"full_attention": glob,
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        else:
            out["rope_parameters"] = glob
        return out
    return config


FAMILY = Family(
    name="gemma",
    architectures={"Gemma3ForCausalLM": "gemma3_text", "Gemma2ForCausalLM": "gemma2"},
    spec_from_config=spec_from_config,
    layout=llama_layout,
    gguf=(GgufArch("gemma3", "Gemma3ForCausalLM", "gemma3_text", permute_qk=False,
                   block_names=GEMMA_CPP_BLOCK_NAMES, global_names=LLAMA_CPP_GLOBAL_NAMES, norm_shift=1.0,
                   config=_gguf_config(6)),
          GgufArch("gemma2", "Gemma2ForCausalLM", "gemma2", permute_qk=False,
                   block_names=GEMMA_CPP_BLOCK_NAMES, global_names=LLAMA_CPP_GLOBAL_NAMES, norm_shift=1.0,
                   config=_gguf_config(2))),
)
