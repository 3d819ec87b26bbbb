"""The Llama-family forward pass in JAX: pure functions over an explicit params pytree.

Layers are stacked on a leading axis and run under `lax.scan`, so a graph holds one layer body whatever the
depth (fast compiles); the KV cache rides in the scan carry and is updated in place. Projections are fused
(q|k|v and gate|up) so each layer does four matmuls.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kiln.kernels.attention import paged_attention, write_kv
from kiln.kernels.norms import rms_norm
from kiln.kernels.rope import apply_rope, inv_frequencies, rope_tables
from kiln.models.spec import ModelError, ModelSpec

Params = dict[str, Any]


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the spec needs, with its HF shape ([out, in] for linear weights)."""
    D, F, V, Dh = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.head_dim
    q, kv = spec.num_heads * Dh, spec.num_kv_heads * Dh
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F)})
        if spec.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if spec.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (D,)
        if spec.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (F,), p + "mlp.up_proj.bias": (F,),
                           p + "mlp.down_proj.bias": (D,)})
    return shapes


def check_tensors(spec: ModelSpec, tensors: dict[str, np.ndarray]) -> None:
    """Fail loudly on a missing or mis-shaped tensor; nothing is ever left random."""
    for name, shape in expected_shapes(spec).items():
        if name not in tensors:
            raise ModelError(f"weights are missing tensor {name} (expected shape {list(shape)})")
        if tuple(tensors[name].shape) != shape:
            raise ModelError(f"tensor {name} has shape {list(tensors[name].shape)}, "
                             f"expected {list(shape)} from the model config")


def params_from_hf(spec: ModelSpec, tensors: dict[str, np.ndarray], dtype) -> Params:
    """HF-named tensors -> stacked, fused, [in, out] params on the default device."""
    check_tensors(spec, tensors)
    L = spec.num_layers
    t = lambda name: np.asarray(tensors[name], dtype=np.float32)
    layer = lambda i, name: t(f"model.layers.{i}.{name}")
    stack = lambda fn: jnp.asarray(np.stack([fn(i) for i in range(L)]), dtype=dtype)
    attn = ("q", "k", "v")
    p: Params = {
        "embed": jnp.asarray(t("model.embed_tokens.weight"), dtype=dtype),              # [V, D]
        "norm": jnp.asarray(t("model.norm.weight"), dtype=dtype),                       # [D]
        "ln1": stack(lambda i: layer(i, "input_layernorm.weight")),                     # [L, D]
        "ln2": stack(lambda i: layer(i, "post_attention_layernorm.weight")),            # [L, D]
        "wqkv": stack(lambda i: np.concatenate(
            [layer(i, f"self_attn.{n}_proj.weight") for n in attn]).T),                # [L, D, Q+2KV]
        "wo": stack(lambda i: layer(i, "self_attn.o_proj.weight").T),                   # [L, Q, D]
        "wgu": stack(lambda i: np.concatenate(
            [layer(i, "mlp.gate_proj.weight"), layer(i, "mlp.up_proj.weight")]).T),    # [L, D, 2F]
        "wd": stack(lambda i: layer(i, "mlp.down_proj.weight").T),                      # [L, F, D]
    }
    if spec.attention_bias:
        p["bqkv"] = stack(lambda i: np.concatenate([layer(i, f"self_attn.{n}_proj.bias") for n in attn]))
    if spec.o_bias:
        p["bo"] = stack(lambda i: layer(i, "self_attn.o_proj.bias"))
    if spec.mlp_bias:
        p["bgu"] = stack(lambda i: np.concatenate([layer(i, "mlp.gate_proj.bias"), layer(i, "mlp.up_proj.bias")]))
        p["bd"] = stack(lambda i: layer(i, "mlp.down_proj.bias"))
    if not spec.tie_word_embeddings:
        p["lm_head"] = jnp.asarray(t("lm_head.weight").T, dtype=dtype)                 # [D, V]
    return p


def _linear(x, w, b=None):
    y = jnp.einsum("...i,io->...o", x, w)
    return y if b is None else y + b


def _layer_weights(params: Params) -> dict[str, jax.Array]:
    return {k: v for k, v in params.items() if k not in ("embed", "norm", "lm_head")}


def forward(spec: ModelSpec, params: Params, k_cache: jax.Array, v_cache: jax.Array, tokens: jax.Array,
            positions: jax.Array, slots: jax.Array, attend) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run every layer over tokens [B, T] at positions [B, T], then write their K/V to cache slots [B, T].

    `attend(q, k, v, k_cache, v_cache, layer)` is the attention of the step kind (prefill or decode) with
    its metadata closed over; it reads the cache, which the layer loop never modifies.
    Returns (final-normed hidden [B, T, D], k_cache, v_cache).
    """
    B, T = tokens.shape
    H, KVH, Dh = spec.num_heads, spec.num_kv_heads, spec.head_dim
    inv_freq = jnp.asarray(inv_frequencies(Dh, spec.rope_theta, spec.rope_scaling))
    cos, sin = rope_tables(positions, inv_freq)                            # [B, T, 1, Dh] each
    x = params["embed"][tokens]                                            # [B, T, D]

    def body(x, layer_and_weights):
        layer, lw = layer_and_weights
        h = rms_norm(x, lw["ln1"], spec.rms_norm_eps)                      # [B, T, D]
        qkv = _linear(h, lw["wqkv"], lw.get("bqkv"))                       # [B, T, (H+2KVH)*Dh]
        q = qkv[..., :H * Dh].reshape(B, T, H, Dh)                         # [B, T, H, Dh]
        k = qkv[..., H * Dh:(H + KVH) * Dh].reshape(B, T, KVH, Dh)         # [B, T, KVH, Dh]
        v = qkv[..., (H + KVH) * Dh:].reshape(B, T, KVH, Dh)               # [B, T, KVH, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = attend(q, k, v, k_cache, v_cache, layer)                       # [B, T, H, Dh]
        x = x + _linear(a.reshape(B, T, H * Dh), lw["wo"], lw.get("bo"))   # [B, T, D]
        h = rms_norm(x, lw["ln2"], spec.rms_norm_eps)
        gu = _linear(h, lw["wgu"], lw.get("bgu"))                          # [B, T, 2F]
        g, u = jnp.split(gu, 2, axis=-1)                                   # [B, T, F] each
        x = x + _linear(jax.nn.silu(g) * u, lw["wd"], lw.get("bd"))        # [B, T, D]
        return x, (k.reshape(B * T, KVH, Dh), v.reshape(B * T, KVH, Dh))

    layers = jnp.arange(spec.num_layers, dtype=jnp.int32)
    x, (k_new, v_new) = jax.lax.scan(body, x, (layers, _layer_weights(params)))  # k_new [L, B*T, KVH, Dh]
    flat_slots = slots.reshape(B * T)                                      # [B*T]
    k_cache, v_cache = write_kv(k_cache, flat_slots, k_new), write_kv(v_cache, flat_slots, v_new)
    return rms_norm(x, params["norm"], spec.rms_norm_eps), k_cache, v_cache


def lm_head(params: Params, h: jax.Array) -> jax.Array:
    """Hidden [..., D] -> float32 logits [..., V]."""
    w = params["lm_head"] if "lm_head" in params else params["embed"].T   # [D, V]
    return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)


def attend_fn(block_tables, prefix_lens, q_lens, scale, *, decode: bool):
    """Attention with a step's metadata closed over: new tokens over the cached prefix [B, NBt] + themselves."""
    def attend(q, k, v, k_cache, v_cache, layer):
        return paged_attention(q, k, v, k_cache, v_cache, layer, block_tables, prefix_lens, q_lens, scale,
                               prefix_always=decode)
    return attend
