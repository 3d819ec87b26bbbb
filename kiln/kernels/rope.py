"""Rotary position embeddings (HF `rotate_half` layout), with Llama-3 style or linear frequency scaling."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kiln.models.spec import LinearRopeScaling, RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | LinearRopeScaling | None,
                    rotary_dim: int | None = None) -> np.ndarray:
    """The per-pair inverse frequencies, [head_dim // 2] float32, computed on the host once. With a partial
    `rotary_dim`, the frequencies of a rotary_dim-wide RoPE come first and the remaining pairs get 0 (cos 1,
    sin 0: unrotated); the layout has moved the pass-through dims of q and k there (models/phi3.py)."""
    if rotary_dim is not None and rotary_dim < head_dim:
        inv = inv_frequencies(rotary_dim, theta, scaling)
        return np.concatenate([inv, np.zeros((head_dim - rotary_dim) // 2, np.float32)])
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if isinstance(scaling, LinearRopeScaling):  # transformers' _compute_linear_scaling_rope_parameters
        inv = inv / scaling.factor
    elif scaling is not None:  # transformers' _compute_llama3_parameters
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin for positions [..., S]: [..., S, 1, D], computed once per step and shared by every layer."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # [..., S, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]          # [..., S, 1, D]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [..., S, H, D] rotated by the tables of `rope_tables`."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)  # [..., S, H, D]
    return (xf * cos + rotated * sin).astype(x.dtype)
