"""The decoder forward pass in JAX: one decoder layer over the spec's LayerSpec, pure functions over an explicit
params pytree.

Weights come from the checkpoint through models/tensors.py in kiln's layout (models/layout.py) and keep its
names: `embed`, `final_norm`, `head`, and per layer `attn_norm`, `qkv`, `o`, `mlp_norm`, `gate_up`, `down`
(+ `*_bias` where the LayerSpec has them). Per-layer tensors are stacked on a leading axis and run under
`lax.scan`, so a graph holds one layer body whatever the depth (fast compiles); the layer body reads the
(uniform) LayerSpec at trace time, so what a spec leaves out costs nothing in the graph. The KV cache rides in
the scan carry and is updated in place. Projections are fused (q|k|v and gate|up): four matmuls a layer.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kiln.kernels.attention import paged_attention, write_kv
from kiln.kernels.norms import rms_norm
from kiln.kernels.rope import apply_rope, inv_frequencies, rope_tables
from kiln.models.spec import LayerSpec, ModelSpec
from kiln.models.tensors import check_tensors, expected_shapes, source_tensors  # noqa: F401 (re-exported)

Params = dict[str, Any]
GLOBALS = ("embed", "final_norm", "head")
IMPLEMENTED: frozenset[str] = frozenset()   # ModelSpec.features() this backend runs (biases always do)


def params_from_hf(spec: ModelSpec, tensors: dict[str, np.ndarray], dtype) -> Params:
    """HF-named tensors -> kiln-named params on the default device: linear weights [in, out], per-layer
    tensors stacked [L, ...] for the scan."""
    spec.check_supported("jax", IMPLEMENTED)
    src = source_tensors(spec, tensors)
    io = lambda w: w.T if w.ndim == 2 else w                                   # [out, in] -> [in, out]
    p: Params = {"embed": jnp.asarray(src.get("embed"), dtype=dtype)}          # [V, D], a lookup table
    p.update({name: jnp.asarray(io(src.get(name)), dtype=dtype) for name in GLOBALS[1:] if name in src})
    for name in src.layout.layers[0]:                                          # e.g. qkv [L, D, (H+2KVH)*Dh]
        p[name] = jnp.asarray(np.stack([io(src.layer(i, name)) for i in range(spec.num_layers)]), dtype=dtype)
    return p


def _linear(x, w, b=None):
    y = jnp.einsum("...i,io->...o", x, w)
    return y if b is None else y + b


def decoder_layer(ls: LayerSpec, spec: ModelSpec, lw: dict[str, jax.Array], x, cos, sin, attend, layer):
    """One pre-norm layer over x [B, T, D]: attention (reading the cache through `attend`), then the SiLU-gated
    MLP, with the biases `ls` names. Returns (x [B, T, D], this step's k and v [B, T, KVH, Dh])."""
    B, T, _ = x.shape
    H, KVH, Dh, eps = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.norm.eps
    bias = lambda name, used: lw[name] if used else None
    at, mlp = ls.attention, ls.mlp
    h = rms_norm(x, lw["attn_norm"], eps)                                  # [B, T, D]
    qkv = _linear(h, lw["qkv"], bias("qkv_bias", at.qkv_bias))             # [B, T, (H+2KVH)*Dh]
    q = qkv[..., :H * Dh].reshape(B, T, H, Dh)                             # [B, T, H, Dh]
    k = qkv[..., H * Dh:(H + KVH) * Dh].reshape(B, T, KVH, Dh)             # [B, T, KVH, Dh]
    v = qkv[..., (H + KVH) * Dh:].reshape(B, T, KVH, Dh)                   # [B, T, KVH, Dh]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = attend(q, k, v, layer)                                             # [B, T, H, Dh]
    x = x + _linear(a.reshape(B, T, H * Dh), lw["o"], bias("o_bias", at.o_bias))    # [B, T, D]
    h = rms_norm(x, lw["mlp_norm"], eps)
    gu = _linear(h, lw["gate_up"], bias("gate_up_bias", mlp.bias))         # [B, T, 2F]
    g, u = jnp.split(gu, 2, axis=-1)                                       # [B, T, F] each
    x = x + _linear(jax.nn.silu(g) * u, lw["down"], bias("down_bias", mlp.bias))    # [B, T, D]
    return x, k, v


def forward(spec: ModelSpec, params: Params, k_cache: jax.Array, v_cache: jax.Array, tokens: jax.Array,
            positions: jax.Array, slots: jax.Array, attend) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run every layer over tokens [B, T] at positions [B, T], then write their K/V to cache slots [B, T].

    `attend(q, k, v, k_cache, v_cache, layer)` is the attention of the step kind (prefill or decode) with
    its metadata closed over; it reads the cache, which the layer loop never modifies.
    Returns (final-normed hidden [B, T, D], k_cache, v_cache).
    """
    B, T = tokens.shape
    KVH, Dh = spec.num_kv_heads, spec.head_dim
    ls = spec.layers[0]                    # params_from_hf checked every layer runs this code
    rope = ls.attention.rope
    cos, sin = rope_tables(positions, jnp.asarray(inv_frequencies(Dh, rope.theta, rope.scaling)))  # [B,T,1,Dh]
    x = params["embed"][tokens]                                            # [B, T, D]

    def body(x, layer_and_weights):
        layer, lw = layer_and_weights
        step_attend = lambda q, k, v, layer: attend(q, k, v, k_cache, v_cache, layer)
        x, k, v = decoder_layer(ls, spec, lw, x, cos, sin, step_attend, layer)
        return x, (k.reshape(B * T, KVH, Dh), v.reshape(B * T, KVH, Dh))

    layers = jnp.arange(spec.num_layers, dtype=jnp.int32)
    per_layer = {k: v for k, v in params.items() if k not in GLOBALS}
    x, (k_new, v_new) = jax.lax.scan(body, x, (layers, per_layer))         # k_new [L, B*T, KVH, Dh]
    flat_slots = slots.reshape(B * T)                                      # [B*T]
    k_cache, v_cache = write_kv(k_cache, flat_slots, k_new), write_kv(v_cache, flat_slots, v_new)
    return rms_norm(x, params["final_norm"], spec.norm.eps), k_cache, v_cache


def lm_head(params: Params, h: jax.Array) -> jax.Array:
    """Hidden [..., D] -> float32 logits [..., V]."""
    w = params["head"] if "head" in params else params["embed"].T         # [D, V]
    return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)


def attend_fn(block_tables, prefix_lens, q_lens, scale, *, decode: bool):
    """Attention with a step's metadata closed over: new tokens over the cached prefix [B, NBt] + themselves."""
    def attend(q, k, v, k_cache, v_cache, layer):
        return paged_attention(q, k, v, k_cache, v_cache, layer, block_tables, prefix_lens, q_lens, scale,
                               prefix_always=decode)
    return attend
