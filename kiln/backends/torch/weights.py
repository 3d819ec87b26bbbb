"""Weights of the torch backend: fused projections in the compute dtype, plus 4-bit copies where lossless.

A GGUF Q4_1 tensor dequantised to float32 holds, in each group of 32 inputs of an output row, values
min + q * step with q in [0, 16), the group's min at q = 0 and its max at q = 15. Such a group is re-quantised
exactly as (q - 8) * scale + zero (scale and zero rounded to bf16, the precision of the dense bf16 copy), the
format of ATen's CPU int4 matmul (`_weight_int4pack_mm_for_cpu`). At batch 1 that reads ~1/4 of the bytes of
bf16; from ~8 tokens on, the bf16 matmul (oneDNN) is faster, so both copies are kept and each step picks by its
token count. The head gets an int8 copy (per-row scales, approximate) for the same small steps: the model
re-scores every row's top logits in float32 from the exact head weights.

Every other legacy GGUF block format (Q4_0, Q5_0, Q5_1, Q8_0; Q4_1 too when the int4 copy is not kept, as in
float32) is recovered exactly from the dequantised values as its GGUF blocks (quant.py) and multiplied by
kiln's own kernel (csrc/quant.cpp) in steps of fewer than QUANT_M tokens, the activations rounded to int8 per
block (llama.cpp's method) unless `int8_act` is False (`--quantization exact`).
"""
from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from kiln.backends.torch.quant import QuantWeight, recover
from kiln.models.spec import ModelSpec, MoeSpec
from kiln.models.tensors import source_tensors

log = logging.getLogger(__name__)

GROUP = 32             # int4 group size along the input dimension (= the GGUF block size)
PACK_BATCH = 64        # the batch size oneDNN's packed weight layout is tuned for (it serves any batch)
SMALL_M = 8            # steps with fewer tokens than this use the int4/int8 copies (measured crossover, BENCHMARKS.md)
QUANT_M = 8            # ... and the GGUF-block copies (scripts/bench_quant.py --kernels measures the crossover)


def lossless_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """w [N, K] float32 -> (packed int4 weight, scales_and_zeros [K/G, N, 2] bf16) when every group of GROUP
    inputs is exactly min + q * step with q in [0, 16); else None."""
    N, K = w.shape
    if K % GROUP or N % 8:
        return None
    g = w.reshape(N, K // GROUP, GROUP)                              # [N, K/G, G]
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)      # [N, K/G, 1]
    scale = (hi - lo) / 15
    q = torch.where(scale > 0, (g - lo) / torch.where(scale > 0, scale, 1), 0).round()
    if ((q * scale + lo - g).abs() > 1e-3 * scale + 1e-6 * (lo.abs() + hi.abs())).any():
        return None
    q = q.clamp(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale                                            # (q - 8) * scale + zero == q * scale + lo
    sz = torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/G, N, 2]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8), sz


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """w [out, in] in oneDNN's blocked layout, or None where this PyTorch has no oneDNN. Measured here
    (BENCHMARKS.md): ~1.5x faster bf16 and ~2.6x faster float32 matmuls than F.linear on the plain weight."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH)
    except (AttributeError, RuntimeError):
        return None


@dataclasses.dataclass
class Linear:
    weight: torch.Tensor | None                           # [out, in], compute dtype (oneDNN-packed if `packed`);
    #                                                       None: no dense copy, the blocks serve every step
    bias: torch.Tensor | None = None                      # [out]
    int4: tuple[torch.Tensor, torch.Tensor] | None = None # lossless_int4's result, when kept
    packed: bool = False
    int8: tuple[torch.Tensor, torch.Tensor] | None = None # int8 [out, in] + bf16 row scales (the head only)
    quant: QuantWeight | None = None                      # the exact GGUF blocks of the weight, when kept

    @classmethod
    def of(cls, w: torch.Tensor | None, bias: torch.Tensor | None = None, int4=None, quant=None) -> "Linear":
        p = pack(w) if w is not None else None
        return cls(w if p is None else p, bias, int4, p is not None, quant=quant)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> [M, out]."""
        if x.shape[0] < SMALL_M and self.int4 is not None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.int4[0], GROUP, self.int4[1])
            return y if self.bias is None else y + self.bias
        if self.quant is not None and (x.shape[0] < QUANT_M or self.weight is None):
            y = self.quant(x)
            return y if self.bias is None else y + self.bias
        if x.shape[0] < SMALL_M and self.int8 is not None:
            y = torch.ops.aten._weight_int8pack_mm(x, *self.int8)
            return y if self.bias is None else y + self.bias
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def bytes_read(self, m: int) -> int:
        """Weight bytes one call with m input rows reads."""
        if m < SMALL_M and (self.int4 or self.int8):
            return sum(t.nbytes for t in (self.int4 or self.int8))
        if self.quant is not None and (m < QUANT_M or self.weight is None):
            return self.quant.nbytes
        return self.weight.nbytes

    @property
    def resident_bytes(self) -> int:
        """Bytes this projection holds in memory, every copy counted."""
        ts = [self.weight, self.bias, *(self.int4 or ()), *(self.int8 or ())]
        return sum(t.nbytes for t in ts if t is not None) + (self.quant.nbytes if self.quant else 0)


@dataclasses.dataclass
class Layer:
    attn_norm: torch.Tensor  # [D] float32 (the residual stream is float32)
    mlp_norm: torch.Tensor   # [D] float32
    qkv: Linear              # D -> (H + 2 KVH) Dh, with the q/k/v bias where the AttentionSpec has one
    o: Linear                # H Dh -> D
    gate_up: Linear | None   # D -> 2F (None in a mixture-of-experts layer)
    down: Linear | None      # F -> D
    rope: int = 0            # index into Weights.ropes
    router: torch.Tensor | None = None                  # [E, D] float32 (mixture of experts)
    experts: list[tuple[Linear, Linear]] | None = None  # per expert: gate_up D -> 2F, down F -> D
    shared: tuple[Linear, Linear, torch.Tensor] | None = None   # shared expert gate_up, down; its gate [1, D]
    q_norm: torch.Tensor | None = None          # [Dh] float32 (qk_norm)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # [D] float32 (sandwich norms)
    post_mlp_norm: torch.Tensor | None = None


@dataclasses.dataclass
class Weights:
    embed: torch.Tensor    # [V, D]
    norm: torch.Tensor     # [D] float32
    head: Linear           # D -> V
    head32: torch.Tensor | None  # [V, D] float32 head rows for re-scoring the top candidates (bf16 only)
    layers: list[Layer]
    # per distinct RopeSpec: cos [max_pos, Dh] and sin [max_pos, Dh] float32, sin's first half negated:
    # rope(x) = x cos + roll(x, Dh/2) sin
    ropes: list[tuple[torch.Tensor, torch.Tensor]]

    def projections(self) -> list[Linear]:
        """Every layer's projections (experts' included), in order."""
        out = []
        for l in self.layers:
            out += [lin for lin in (l.qkv, l.o, l.gate_up, l.down) if lin is not None]
            out += [lin for pair in (l.experts or []) for lin in pair]
            out += list(l.shared[:2]) if l.shared else []
        return out

    def bytes_read(self, m: int) -> int:
        """Weight bytes a step of m tokens reads (the bandwidth bound of small batches)."""
        return sum(lin.bytes_read(m) for lin in self.projections() + [self.head])

    @property
    def num_int4(self) -> int:
        return sum(lin.int4 is not None for lin in self.projections())

    def quant_formats(self) -> dict[str, int]:
        """GGUF block format -> how many layer projections are kept in it."""
        out: dict[str, int] = {}
        for lin in self.projections():
            if lin.quant is not None:
                out[lin.quant.fmt] = out.get(lin.quant.fmt, 0) + 1
        return out

    @property
    def resident_bytes(self) -> int:
        """Weight bytes held in memory: every projection's copies, the embedding, head, norms, rope tables."""
        lins = self.projections() + [self.head] if self.head.weight is not self.embed else self.projections()
        n = sum(lin.resident_bytes for lin in lins) + self.embed.nbytes
        if self.head.weight is self.embed:                  # tied: the head's extra copies only
            n += sum(t.nbytes for t in (self.head.int8 or ()))
        n += self.head32.nbytes if self.head32 is not None else 0
        small = [self.norm] + [t for l in self.layers for t in (l.attn_norm, l.mlp_norm, l.router, l.q_norm,
                                                                   l.k_norm, l.post_attn_norm, l.post_mlp_norm)]
        return n + sum(t.nbytes for t in small if t is not None)


# ModelSpec.features() this backend runs (biases, RoPE scaling and sliding windows always do)
IMPLEMENTED: frozenset[str] = frozenset({
    "qk_norm", "attention scale", "attention logit softcap", "sandwich-norm layers", "gelu_tanh activation",
    "per-layer rope", "embedding scale", "final logit softcap", "rms_plus_one norm", "mixture of experts"})
NORMS = ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")


def rope_tables(spec: ModelSpec, max_pos: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """cos/sin tables per distinct RopeSpec of the layers, and each layer's index into them."""
    from kiln.kernels.rope import inv_frequencies   # (kernels/rope.py imports jax for its other functions)
    specs = list(dict.fromkeys(l.attention.rope for l in spec.layers))
    tables = []
    for rope in specs:
        inv = torch.from_numpy(inv_frequencies(spec.head_dim, rope.theta, rope.scaling, rope.rotary_dim))     # [Dh/2]
        f = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv                          # [P, Dh/2]
        tables.append((torch.cat([f.cos(), f.cos()], -1), torch.cat([-f.sin(), f.sin()], -1)))
    return tables, [specs.index(l.attention.rope) for l in spec.layers]


def _with_act(q: QuantWeight | None, int8_act: bool) -> QuantWeight | None:
    if q is not None:
        q.int8_act = int8_act
    return q


def load_weights(spec: ModelSpec, tensors: dict[str, np.ndarray], dtype: torch.dtype, int4: bool,
                 max_pos: int, int8_act: bool = True, dense: bool = True) -> Weights:
    """HF-named float32 tensors -> Weights, one Layer per LayerSpec (kiln's layout, models/layout.py: fused
    qkv and gate_up, biases where the spec has them); `int4` keeps quantised copies where they are exact:
    lossless 4-bit copies (bf16), else the GGUF blocks of a projection's weight (quant.py), multiplied with
    int8-rounded activations (`int8_act`, llama.cpp's method) or float32 ones. `dense` False: a projection
    kept as blocks has no dense copy beside them (the block kernel serves every step size)."""
    spec.check_supported("torch", IMPLEMENTED)
    from kiln.backends.torch import kernels
    blocks = int4 and kernels.load_quant() is not None      # the GGUF-block kernel is built for this CPU
    int4 = int4 and dtype == torch.bfloat16                 # ATen's int4 kernel and the int8 head: bf16 only
    src = source_tensors(spec, tensors)
    recover_ = lambda w: _with_act(recover(w), int8_act)
    # memory-mapped safetensors are read-only; every tensor made here is copied (cast, packed) or only read
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    t = lambda w: torch.from_numpy(w)

    def linear(i: int, name: str, bias: bool, w: torch.Tensor | None = None) -> Linear:
        w = t(src.layer(i, name)) if w is None else w                      # [out, in] float32
        b = t(src.layer(i, name + "_bias")).to(dtype) if bias else None
        i4 = lossless_int4(w) if int4 else None
        q = recover_(w) if blocks and i4 is None else None
        return Linear.of(None if q is not None and not dense else w.to(dtype).contiguous(), b, i4, q)

    def moe(i: int, mlp: MoeSpec) -> dict:
        E = mlp.num_experts
        gu, dn = t(src.layer(i, "experts_gate_up")).chunk(E), t(src.layer(i, "experts_down")).chunk(E)
        out = {"router": t(src.layer(i, "router")), "gate_up": None, "down": None,
               "experts": [(linear(i, "", False, g), linear(i, "", False, d)) for g, d in zip(gu, dn)]}
        if mlp.shared_expert_size:
            out["shared"] = (linear(i, "shared_gate_up", False), linear(i, "shared_down", False),
                             t(src.layer(i, "shared_gate")))
        return out

    plus = 1.0 if spec.norm.kind == "rms_plus_one" else 0.0           # Gemma's (1 + weight), folded once
    norm = lambda i, name: (t(src.layer(i, name)) + plus) if src.has_layer(name) else None   # float32
    ropes, rope_of = rope_tables(spec, max_pos)
    layers = []
    for i, ls in enumerate(spec.layers):
        a, m = ls.attention, ls.mlp
        mlp = moe(i, m) if isinstance(m, MoeSpec) else dict(gate_up=linear(i, "gate_up", m.bias),
                                                             down=linear(i, "down", m.bias))
        layers.append(Layer(
            attn_norm=norm(i, "attn_norm"), mlp_norm=norm(i, "mlp_norm"),
            qkv=linear(i, "qkv", a.qkv_bias), o=linear(i, "o", a.o_bias), **mlp, rope=rope_of[i],
            q_norm=norm(i, "q_norm"), k_norm=norm(i, "k_norm"), post_attn_norm=norm(i, "post_attn_norm"),
            post_mlp_norm=norm(i, "post_mlp_norm")))
    embed32 = t(src.get("embed"))
    embed = embed32.to(dtype).contiguous()
    head32 = embed32 if spec.tie_word_embeddings else t(src.get("head"))
    head = Linear.of(embed if spec.tie_word_embeddings else head32.to(dtype).contiguous())
    if int4:   # an approximate head at small batches: the top candidates are re-scored exactly anyway
        scale = head32.abs().amax(1).clamp(min=1e-12) / 127                  # [V]
        head.int8 = ((head32 / scale[:, None]).round().to(torch.int8).contiguous(), scale.to(dtype))
    elif blocks:   # float32: the head's exact blocks (a GGUF's token_embd / output), float32 activations
        head.quant = recover_(head32)
        if head.quant is not None and not dense and not spec.tie_word_embeddings:
            head.weight, head.packed = None, False
    w = Weights(embed, t(src.get("final_norm")) + plus, head, head32 if dtype != torch.float32 else None,
                layers, ropes)
    if int4:
        log.info("kept %d of %d layer projections 4-bit (lossless re-quantisation of the source weights)",
                 w.num_int4, len(w.projections()))
    if blocks:
        fmts = w.quant_formats()
        if head.quant is not None:
            log.info("kept the head as its exact GGUF blocks (%s)", head.quant.fmt)
        log.info("kept %d of %d layer projections as their exact GGUF blocks (%s); activations %s", sum(fmts.values()),
                 len(w.projections()), ", ".join(f"{k}: {v}" for k, v in sorted(fmts.items())) or "none",
                 "rounded to int8 per block (llama.cpp's method)" if int8_act else "float32")
    log.info("resident weight bytes: %.1f MB (%s); a 1-token step reads %.1f MB", w.resident_bytes / 1e6,
             dtype, w.bytes_read(1) / 1e6)
    return w
