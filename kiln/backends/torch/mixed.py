"""A mixed step on the torch backend: decode rows and prefill chunks in one forward.

The linear layers run over the real tokens of both kinds concatenated [N, D] (decodes first, then each prefill
row's tokens, N rounded up to `align` with rows nothing reads, which bounds the shapes oneDNN sees); attention
is split by row kind: the decode rows through the csrc decode kernel, the prefill rows through model.py's
`_prefill_rows` (RoPE, K/V write, `_prefill_attention`) over their padded [Bp, Tp] layout.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kiln.backends.torch import kernels
from kiln.backends.torch import model as TM
from kiln.backends.torch.weights import Layer, Weights
from kiln.models.spec import LayerSpec, ModelSpec


@dataclasses.dataclass
class _Mixed:
    """A mixed step: rows [0, n_dec) of the flat token batch are decodes (q_len 1, attention by `dec`), the next
    n_pre the prefill rows' real tokens, laid out in `pre`'s padded [Bp, Tp] at flat positions `index`."""
    dec: TM._Step
    pre: TM._Step
    n_dec: int
    index: torch.Tensor                    # [n_pre] positions in [Bp * Tp] of the prefill rows' real tokens
    H: int
    KVH: int
    Dh: int

    def attend(self, ls: LayerSpec, lw: Layer, qkv: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
               scale: float) -> torch.Tensor:
        """qkv [N, C] (decode rows, prefill tokens, then alignment rows) -> [N, H*Dh] (alignment rows: 0)."""
        d, n_pre, pre = self.n_dec, self.index.shape[0], self.pre
        out = qkv.new_zeros(qkv.shape[0], self.H * self.Dh)
        out[:d] = TM._attend(self.dec, ls, lw, qkv[:d], kc, vc, scale)
        padded = qkv.new_zeros(pre.B * pre.T, qkv.shape[1])                          # [Bp*Tp, C]
        padded[self.index] = qkv[d:d + n_pre]
        out[d:d + n_pre] = TM._prefill_rows(pre, ls, lw, padded, kc, vc, scale)[self.index]
        return out


@torch.inference_mode()
def forward_mixed(spec: ModelSpec, w: Weights, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int,
                  dec, pre, align: int = 1, all_positions: bool = False):
    """One mixed step in one forward: `dec` the decode rows' arrays ([Bd, 1]; backends/inputs.StepInputs) and
    `pre` the prefill rows' ([Bp, Tp], lens real). The linear layers run over the real tokens only, concatenated
    [N, D] (decodes, then each prefill row's tokens; N rounded up to `align` with rows nothing reads); attention
    is split by row kind (`_Mixed.attend`). Returns logits [Bd + Bp, V] float32 (decode rows, then each prefill
    row's last real token); with all_positions, (those logits, the prefill rows' final-normed hidden states
    [Bp, Tp, D] float32)."""
    Bd, (Bp, Tp) = dec.tokens.shape[0], pre.tokens.shape
    real = np.arange(Tp)[None, :] < pre.lens[:, None]                            # [Bp, Tp]
    index = np.flatnonzero(real)                                                  # [n_pre]
    n = Bd + index.size
    pad = -n % align
    tok = torch.from_numpy(np.concatenate([dec.tokens[:, 0], pre.tokens.reshape(-1)[index],
                                           np.zeros(pad, np.int32)])).long()      # [N]
    parts = []
    for x_ in (dec, pre):
        pos = torch.from_numpy(x_.positions).long()
        parts.append(TM._step(spec, w, block_size, pos, torch.from_numpy(x_.lens).long(), x_.slots, x_.tables,
                              x_.positions, x_.lens))
    st = _Mixed(parts[0], parts[1], Bd, torch.from_numpy(index).long(), spec.num_heads, spec.num_kv_heads,
                spec.head_dim)
    dt, D = w.embed.dtype, w.embed.shape[1]
    eps, kern = spec.norm.eps, kernels.load()
    x = w.embed[tok].float()                                                      # [N, D] float32 residual
    if spec.embed_scale is not None:
        x *= spec.embed_scale
    delta = None
    for ls, lw, kc, vc in zip(spec.layers, w.layers, k_cache, v_cache):
        delta = TM.decoder_layer(ls, lw, st, x, delta, kc, vc, kern, spec, dt)
    x += delta
    last = torch.from_numpy(np.concatenate([np.arange(Bd), Bd + np.cumsum(pre.lens) - 1])).long()  # [Bd + Bp]
    if all_positions:
        h = TM._add_norm(kern, x, None, w.norm, eps, torch.float32)                  # [N, D] float32
        h_pre = h.new_zeros(Bp * Tp, D)
        h_pre[st.index] = h[Bd:n]
        return TM.head(spec, w, h[last].contiguous()), h_pre.view(Bp, Tp, D)
    return TM.head(spec, w, TM._add_norm(kern, x[last].contiguous(), None, w.norm, eps, torch.float32))
