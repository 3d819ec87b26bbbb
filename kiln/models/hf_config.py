"""config.json fields every family reads alike: dimensions, token ids, norm epsilon, RoPE, the activation, the
sliding window of the layers that slide.

Both spellings of RoPE are read: transformers 4.x's `rope_theta` + `rope_scaling` and transformers 5's
`rope_parameters` (theta and scaling in one dict).
"""
from __future__ import annotations

from typing import Any

from kiln.models.spec import LinearRopeScaling, ModelError, NormSpec, RopeScaling, RopeSpec

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}   # HF hidden_act -> kiln


def model_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The model-wide ModelSpec fields (all but `layers`) of a decoder-only config."""
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    eos = cfg.get("eos_token_id")
    return dict(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        norm=NormSpec(float(cfg.get("rms_norm_eps", 1e-6))),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
    )


def rope(cfg: dict[str, Any]) -> RopeSpec:
    """RoPE base and scaling; ModelError for a scaling kiln does not implement."""
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    rs = cfg.get("rope_scaling") or params or None
    scaling = None
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                  float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
        elif kind == "linear":
            scaling = LinearRopeScaling(float(rs["factor"]))
        elif kind not in (None, "default"):
            raise ModelError(f"unsupported rope_scaling type {kind!r}; supported: llama3, linear")
    theta = cfg.get("rope_theta")
    if theta is None:
        theta = params.get("rope_theta")
    return RopeSpec(float(theta if theta is not None else 10000.0), scaling)


def activation(cfg: dict[str, Any], default: str = "silu") -> str:
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or default
    if act not in ACTIVATIONS:
        raise ModelError(f"unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def window_fields(kinds: list[str], window: Any) -> list[dict[str, Any]]:
    """Per layer, the AttentionSpec fields of its kind ("full_attention" | "sliding_attention", as transformers'
    `layer_types` names them): {} for a full layer, the window for a sliding one (a ModelError if it has none)."""
    if "sliding_attention" in kinds and not window:
        raise ModelError(f"layer_types has sliding layers but sliding_window is {window!r}")
    return [{"kind": "sliding", "window": int(window)} if k == "sliding_attention" else {} for k in kinds]
