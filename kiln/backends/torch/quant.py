"""GGUF block-quantised weights kept quantised in the torch backend: exact recovery and the matmul.

A GGUF tensor reaches the backend dequantised to float32 (models/gguf_loader.py, and the converted-folder cache).
For the legacy block formats every block of 32 inputs of an output row holds values d * u + m (float32
arithmetic, d and m float16, u integer codes), so the blocks can be recovered from the values exactly:

  Q4_0  u in [0, 16), m = -8 d    the block's largest |value| is -8 d (gguf's quantiser: d = max / -8)
  Q5_0  u in [0, 32), m = -16 d   likewise -16 d
  Q8_0  u in [-127, 127], m = 0   the largest |value| is 127 |d|
  Q4_1  u in [0, 16), m = min     the block's min is m (u = 0) and its max is 15 d + m (u = 15)
  Q5_1  u in [0, 32), m = min     likewise with 31

`recover` finds the first format (fewest bytes first) whose recovered blocks reproduce every value of the
tensor bit for bit, else None (the tensor then stays dense): never a lossy re-quantisation. `QuantWeight`
holds the blocks in llama.cpp's packing (csrc/quant.cpp) and multiplies by them there: by default the
activations are rounded to int8 per block of 32 once per call (llama.cpp's method, in both compute dtypes), the
products summed in int32; with int8_act False (`--quantization exact`) they stay float32 (the weights are
gguf's exactly, float32 rounding only; ~2x the work per weight).
"""
from __future__ import annotations

import dataclasses

import torch

QK = 32
# name: (kernel fmt, code bits, symmetric offset (m = -off d) or None for a stored min, levels - 1)
FORMATS = {"q4_0": (4, 4, 8, 15), "q4_1": (4, 4, None, 15), "q5_0": (5, 5, 16, 31), "q5_1": (5, 5, None, 31),
           "q8_0": (8, 8, 0, 127)}
ORDER = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")   # fewest bytes first
PROBE_ROWS = 4                                     # a format is tried on a few rows before the whole tensor


@dataclasses.dataclass
class QuantWeight:
    fmt: str                      # a FORMATS key
    codes: torch.Tensor           # q8_0: int8 [N, K]; else uint8 [N, K/2], block byte j = u_j | u_(j+16) << 4
    d: torch.Tensor               # float16 [N, K/32]
    m: torch.Tensor | None = None     # float16 [N, K/32] (q4_1, q5_1)
    qh: torch.Tensor | None = None    # int32 [N, K/32], bit j = bit 4 of u_j (q5_0, q5_1)
    int8_act: bool = True             # the default activation method of __call__

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * QK

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.d, self.m, self.qh) if t is not None)

    def ucodes(self) -> torch.Tensor:
        """The integer codes u, int32 [N, K/32, 32]."""
        N, K = self.shape
        if self.fmt == "q8_0":
            return self.codes.to(torch.int32).view(N, K // QK, QK)
        c = self.codes.to(torch.int32).view(N, K // QK, QK // 2)
        u = torch.cat([c & 0xF, c >> 4], -1)                                  # [N, K/32, 32]
        if self.qh is not None:
            bits = (self.qh[..., None] >> torch.arange(QK, dtype=torch.int32)) & 1
            u = u | (bits << 4)
        return u

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: d * u + m, as gguf computes it."""
        N, K = self.shape
        d = self.d.float()[..., None]
        off = FORMATS[self.fmt][2]
        u = self.ucodes().float()
        if self.m is not None:
            w = d * u + self.m.float()[..., None]
        else:
            w = d * (u - off)
        return w.reshape(N, K)

    def __call__(self, x: torch.Tensor, int8_act: bool | None = None) -> torch.Tensor:
        """x [M, K] -> x @ W^T [M, N] in x's dtype, by csrc/quant.cpp. int8_act (default: self.int8_act):
        round the activations to int8 per block (llama.cpp's method), else keep them float32."""
        from kiln.backends.torch import kernels
        fmt, _, off, _ = FORMATS[self.fmt]
        i8 = self.int8_act if int8_act is None else int8_act
        y = kernels.load_quant().quant_matmul(x.float().contiguous(), self.codes, self.qh, self.d, self.m, fmt,
                                              float(off or 0), i8)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def _pack(fmt: str, u: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> QuantWeight:
    """u int32 [N, nb, 32] codes (signed for q8_0), d/m float32 [N, nb] -> QuantWeight."""
    N, nb, _ = u.shape
    if fmt == "q8_0":
        return QuantWeight(fmt, u.to(torch.int8).reshape(N, nb * QK).contiguous(), d.half().contiguous())
    lo, hi = u[..., :QK // 2] & 0xF, u[..., QK // 2:] & 0xF
    codes = (lo | (hi << 4)).to(torch.uint8).reshape(N, nb * QK // 2).contiguous()
    qh = None
    if FORMATS[fmt][1] == 5:
        qh = ((u.long() >> 4) << torch.arange(QK)).sum(-1)                                # [N, nb] int64
        qh = torch.where(qh >= 2**31, qh - 2**32, qh).to(torch.int32).contiguous()
    return QuantWeight(fmt, codes, d.half().contiguous(), None if m is None else m.half().contiguous(), qh)


def _is_half(v: torch.Tensor) -> torch.Tensor:
    return v.half().float() == v


def _try(fmt: str, g: torch.Tensor) -> QuantWeight | None:
    """g float32 [N, nb, 32] -> its blocks in `fmt` when they reproduce g exactly, else None."""
    _, _, off, top = FORMATS[fmt]
    if off is not None:                                                   # symmetric: w = d (u - off)
        amax, i = g.abs().max(-1, keepdim=True)
        d = amax / top if fmt == "q8_0" else g.gather(-1, i) / -off       # [N, nb, 1]
        ok = _is_half(d)
        c = torch.where(d != 0, g / torch.where(d != 0, d, 1), 0)
        ok &= ((c.round() == c) & (c >= -off - (top if fmt == "q8_0" else 0)) & (c <= top - off)).all(-1, True)
        if not ok.all() or not (d * c == g).all():
            return None
        u = c.to(torch.int32) + (0 if fmt == "q8_0" else off)
        return _pack(fmt, u, d[..., 0], None)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)        # affine: w = d u + m, m = min
    if not _is_half(lo).all():
        return None
    d0 = ((hi - lo) / top).half()
    best_d, best_u, found = torch.zeros_like(lo), torch.zeros_like(g, dtype=torch.int32), torch.zeros_like(lo, dtype=torch.bool)
    for step in (0, 1, -1):                                             # d0 and its float16 neighbours
        bits = d0.view(torch.int16) + step
        d = bits.view(torch.float16).float()
        u = torch.where(d > 0, (g - lo) / torch.where(d > 0, d, 1), 0).round().clamp(0, top)
        ok = ((d * u + lo == g).all(-1, True) & torch.isfinite(d) & (d >= 0)) & ~found
        best_d, found = torch.where(ok, d, best_d), found | ok
        best_u = torch.where(ok, u.to(torch.int32), best_u)
    if not found.all():
        return None
    return _pack(fmt, best_u, best_d[..., 0], lo[..., 0])


def recover(w: torch.Tensor, formats: tuple[str, ...] = ORDER) -> QuantWeight | None:
    """w float32 [N, K] -> the first of `formats` that holds it exactly, or None (K not a multiple of 32, or
    not a dequantised GGUF block format)."""
    N, K = w.shape
    if K % QK or w.dtype != torch.float32 or N == 0:
        return None
    g = w.reshape(N, K // QK, QK)
    for fmt in formats:
        if _try(fmt, g[:PROBE_ROWS]) is not None:
            q = _try(fmt, g)
            if q is not None:
                return q
    return None
