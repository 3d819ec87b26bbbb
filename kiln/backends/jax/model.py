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

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kiln.kernels.attention import paged_attention, write_kv
from kiln.kernels.norms import rms_norm
from kiln.kernels.rope import apply_rope, inv_frequencies, rope_tables
from kiln.kernels.moe import dense_experts, route, routed_experts  # noqa: F401 (dense: the benchmark's)
from kiln.models.spec import LayerSpec, ModelSpec, MoeSpec
from kiln.models.tensors import check_tensors, expected_shapes, source_tensors  # noqa: F401 (re-exported)

Params = dict[str, Any]
GLOBALS = ("embed", "final_norm", "head", "final_softcap")   # final_softcap: a scalar, Gemma 2
# ModelSpec.features() this backend runs (biases, RoPE scaling and sliding windows always do)
IMPLEMENTED: frozenset[str] = frozenset({
    "qk_norm", "attention scale", "attention logit softcap", "sandwich-norm layers", "gelu_tanh activation",
    "per-layer rope", "embedding scale", "final logit softcap", "rms_plus_one norm", "mixture of experts"})
NORMS = ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")
GLOBAL_WINDOW = 1 << 30       # the window of a global layer in the per-layer window array: never reached


def params_from_hf(spec: ModelSpec, tensors: dict[str, np.ndarray], dtype) -> Params:
    """HF-named tensors -> kiln-named params on the default device: linear weights [in, out], per-layer
    tensors stacked [L, ...] for the scan. Norm weights of `rms_plus_one` models get their 1 added here."""
    spec.check_supported("jax", IMPLEMENTED)
    src = source_tensors(spec, tensors)
    plus = 1.0 if spec.norm.kind == "rms_plus_one" else 0.0
    io = lambda name, w: w + plus if name in NORMS else (w.T if w.ndim == 2 else w)   # [out, in] -> [in, out]
    p: Params = {"embed": jnp.asarray(src.get("embed"), dtype=dtype)}          # [V, D], a lookup table
    p.update({name: jnp.asarray(io(name, src.get(name)), dtype=dtype) for name in GLOBALS[1:] if name in src})
    E = getattr(spec.layers[0].mlp, "num_experts", 0)
    for name in src.layout.layers[0]:                                          # e.g. qkv [L, D, (H+2KVH)*Dh]
        get = lambda i: io(name, src.layer(i, name))
        if name.startswith("experts_"):     # [E * out, in] -> [E, in, out]
            get = lambda i: (lambda w: w.reshape(E, -1, w.shape[-1]).transpose(0, 2, 1))(src.layer(i, name))
        p[name] = jnp.asarray(np.stack([get(i) for i in range(spec.num_layers)]), dtype=dtype)
    if spec.final_logit_softcap is not None:              # lm_head sees params, not the spec
        p["final_softcap"] = jnp.float32(spec.final_logit_softcap)
    return p


def _dot(spec: str, x, w):
    """x @ w with x cast to w's dtype and float32 accumulation, back in x's dtype: a float32 model is unchanged;
    bf16 matmul weights (backends/jax/tuning.py) keep a float32 residual stream around bf16 matmuls."""
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(x.dtype)


def _linear(x, w, b=None):
    y = _dot("...i,io->...o", x, w)
    return y if b is None else y + b


def _fused(x, w, b=None):
    """A fused projection (qkv, gate_up) of x [..., D] -> [..., G, W/G]: w [D, W] is one group (G = 1); w
    [D, G, W/G] holds G groups, each a whole q|k|v or gate|up of its own heads / columns (backends/jax/mesh.py
    groups them so that each tensor-parallel device's slice is contiguous)."""
    if w.ndim == 2:
        return _linear(x, w, b)[..., None, :]
    y = _dot("...i,igo->...go", x, w)
    return y if b is None else y + b


ACT = {"silu": jax.nn.silu, "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


def _moe(mlp: MoeSpec, lw: dict[str, jax.Array], h):
    """The routed experts (+ the sigmoid-gated shared expert) of h [B, T, D] -> [B, T, D]."""
    B, T, D = h.shape
    x = h.reshape(B * T, D)
    w, ids = route(x, lw["router"], mlp.top_k, mlp.norm_topk)             # [N, k]
    y = EXPERTS(x, w, ids, lw["experts_gate_up"], lw["experts_down"], ACT[mlp.act])   # [N, D]
    if mlp.shared_expert_size:
        g, u = jnp.split(_linear(x, lw["shared_gate_up"]), 2, axis=-1)
        shared = _linear(ACT[mlp.act](g) * u, lw["shared_down"])         # [N, D]
        y = y + jax.nn.sigmoid(_linear(x, lw["shared_gate"])) * shared
    return y.reshape(B, T, D)


EXPERTS = routed_experts     # scripts/bench_moe.py swaps in dense_experts to measure the difference


def _mlp(ls: LayerSpec, lw: dict[str, jax.Array], h):
    """The gated MLP (or mixture of experts) of h [B, T, D] -> [B, T, D]."""
    if isinstance(ls.mlp, MoeSpec):
        return _moe(ls.mlp, lw, h)
    bias = lambda name: lw[name] if ls.mlp.bias else None
    gu = _fused(h, lw["gate_up"], bias("gate_up_bias"))                   # [B, T, G, 2F/G]
    g, u = (t.reshape(*h.shape[:-1], -1) for t in jnp.split(gu, 2, axis=-1))   # [B, T, F] each
    return _linear(ACT[ls.mlp.act](g) * u, lw["down"], bias("down_bias"))  # [B, T, D]


def decoder_layer(ls: LayerSpec, spec: ModelSpec, lw: dict[str, jax.Array], x, cos, sin, attend, layer,
                  window=None):
    """One layer over x [B, T, D]: attention (reading the cache through `attend`), then the gated MLP, with
    the biases, q/k norms and norm placement (`pre` or `sandwich`) `ls` names; `window` is this layer's
    attention span (a traced scalar; None: every layer global). Returns (x [B, T, D], this step's k and v
    [B, T, KVH, Dh])."""
    B, T, _ = x.shape
    H, KVH, Dh, eps = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.norm.eps
    bias = lambda name, used: lw[name] if used else None
    at = ls.attention
    sandwich = ls.norms == "sandwich"
    h = rms_norm(x, lw["attn_norm"], eps)                                  # [B, T, D]
    qkv = _fused(h, lw["qkv"], bias("qkv_bias", at.qkv_bias))              # [B, T, G, Hg + 2 KVg]
    G, Hg = qkv.shape[2], H // qkv.shape[2] * Dh                           # groups; one group's q width
    KVg = (qkv.shape[-1] - Hg) // 2                                        # its k width: KVH/G heads, or all
    q = qkv[..., :Hg].reshape(B, T, H, Dh)                                 # [B, T, H, Dh]
    k, v = qkv[..., Hg:Hg + KVg], qkv[..., Hg + KVg:]                      # [B, T, G, KVg]
    if G > 1 and KVg == KVH * Dh:     # every group holds all KV heads (mesh.py, KV replicated): G equal copies,
        k, v = k.max(axis=2), v.max(axis=2)   # one kept exactly (max of equal values; an all-reduce on a mesh)
    k, v = k.reshape(B, T, KVH, Dh), v.reshape(B, T, KVH, Dh)              # [B, T, KVH, Dh]
    if at.qk_norm:
        q, k = rms_norm(q, lw["q_norm"], eps), rms_norm(k, lw["k_norm"], eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = attend(q, k, v, layer, window=window, scale=attn_scale(ls, spec), softcap=at.logit_softcap)
    a = _linear(a.reshape(B, T, H * Dh), lw["o"], bias("o_bias", at.o_bias))   # [B, T, D]
    x = x + (rms_norm(a, lw["post_attn_norm"], eps) if sandwich else a)
    m = _mlp(ls, lw, rms_norm(x, lw["mlp_norm"], eps))                     # [B, T, D]
    x = x + (rms_norm(m, lw["post_mlp_norm"], eps) if sandwich else m)
    return x, k, v


def attn_scale(ls: LayerSpec, spec: ModelSpec) -> float:
    return ls.attention.scale if ls.attention.scale is not None else spec.head_dim ** -0.5


def _ropes(spec: ModelSpec):
    """The distinct RopeSpecs of the layers and each layer's index into them."""
    ropes = list(dict.fromkeys(l.attention.rope for l in spec.layers))
    return ropes, np.array([ropes.index(l.attention.rope) for l in spec.layers], np.int32)


def forward(spec: ModelSpec, params: Params, k_cache: jax.Array, v_cache: jax.Array, tokens: jax.Array,
            positions: jax.Array, slots: jax.Array, attend) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run every layer over tokens [B, T] at positions [B, T], then write their K/V to cache slots [B, T].

    `attend(q, k, v, k_cache, v_cache, layer, window=, scale=, softcap=)` is the attention of the step kind
    (prefill or decode) with its metadata closed over; it reads the cache, which the layer loop never modifies.
    Per-layer values (the window, which RoPE table) ride the scan as arrays, so layers differing only in them
    share one traced body.
    Returns (final-normed hidden [B, T, D], k_cache, v_cache).
    """
    B, T = tokens.shape
    KVH, Dh = spec.num_kv_heads, spec.head_dim
    ls = spec.layers[0]                    # params_from_hf checked every layer runs this code
    ropes, rope_of = _ropes(spec)
    tables = [rope_tables(positions, jnp.asarray(inv_frequencies(Dh, r.theta, r.scaling, r.rotary_dim))) for r in ropes]
    cos_all = jnp.stack([c for c, _ in tables])                            # [R, B, T, 1, Dh]
    sin_all = jnp.stack([s for _, s in tables])
    sliding = spec.sliding_window is not None
    windows = np.array([l.attention.window or GLOBAL_WINDOW for l in spec.layers], np.int32)   # [L]
    x = params["embed"][tokens]                                            # [B, T, D]
    if spec.embed_scale is not None:
        x = x * jnp.asarray(spec.embed_scale, x.dtype)

    def body(x, xs):
        layer, r, window, lw = xs
        cos, sin = (cos_all[0], sin_all[0]) if len(ropes) == 1 else (cos_all[r], sin_all[r])
        step_attend = lambda q, k, v, layer, **kw: attend(q, k, v, k_cache, v_cache, layer, **kw)
        x, k, v = decoder_layer(ls, spec, lw, x, cos, sin, step_attend, layer, window if sliding else None)
        return x, (k.reshape(B * T, KVH, Dh), v.reshape(B * T, KVH, Dh))

    layers = jnp.arange(spec.num_layers, dtype=jnp.int32)
    per_layer = {k: v for k, v in params.items() if k not in GLOBALS}
    xs = (layers, jnp.asarray(rope_of), jnp.asarray(windows), per_layer)
    x, (k_new, v_new) = jax.lax.scan(body, x, xs)                          # k_new [L, B*T, KVH, Dh]
    flat_slots = slots.reshape(B * T)                                      # [B*T]
    k_cache, v_cache = write_kv(k_cache, flat_slots, k_new), write_kv(v_cache, flat_slots, v_new)
    return rms_norm(x, params["final_norm"], spec.norm.eps), k_cache, v_cache


def lm_head(params: Params, h: jax.Array) -> jax.Array:
    """Hidden [..., D] -> float32 logits [..., V]."""
    w = params["head"] if "head" in params else params["embed"].T         # [D, V]
    logits = jnp.einsum("...d,dv->...v", h.astype(w.dtype), w, preferred_element_type=jnp.float32)
    if "final_softcap" in params:
        cap = params["final_softcap"]
        logits = cap * jnp.tanh(logits / cap)
    return logits


def attend_fn(block_tables, prefix_lens, q_lens, scale, *, decode: bool):
    """Attention with a step's metadata closed over: new tokens over the cached prefix [B, NBt] + themselves."""
    def attend(q, k, v, k_cache, v_cache, layer, *, window=None, scale=scale, softcap=None):
        return paged_attention(q, k, v, k_cache, v_cache, layer, block_tables, prefix_lens, q_lens, scale,
                               prefix_always=decode, window=window, softcap=softcap)
    return attend
