"""The torch backend's kernel choices, side by side on the default model's shapes (batch 64 unless noted).

1. dense matmuls: F.linear on the plain weight vs oneDNN's packed layout (bf16 and float32), all 30 layers;
2. the layer matmuls at batch 1/4/16/64: int4 (lossless copy of the Q4_1 weights) vs int8 vs bf16;
3. decode attention of one layer: kiln's csrc/ kernel vs the torch-ops path (gather, permute, matmuls),
   both with the new token's rope and KV write, over a KV cache spread over 1 GiB as in serving.

    .venv/bin/python scripts/bench_torch_kernels.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from kiln.backends.torch import kernels
from kiln.backends.torch import model as TM
from kiln.backends.torch.weights import GROUP, lossless_int4, pack

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30      # qkv, o, gate_up, down: [out, in]


def ms(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def q4_like(n: int, k: int) -> torch.Tensor:
    q = torch.randint(0, 16, (n, k // GROUP, GROUP)).float()
    q[..., 0], q[..., 1] = 0, 15
    return (torch.randn(n, k // GROUP, 1) * 0.05 + q * (torch.rand(n, k // GROUP, 1) * 0.01 + 1e-3)).reshape(n, k)


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    print("1. dense matmuls of 30 layers, batch 64 (ms)")
    for dt in (torch.bfloat16, torch.float32):
        ws = [torch.randn(n, k).to(dt) for n, k in SHAPES]
        packed = [pack(w) for w in ws]
        xs = {k: torch.randn(64, k).to(dt) for _, k in SHAPES}
        with torch.inference_mode():
            plain = ms(lambda: [F.linear(xs[k], w) for (_, k), w in zip(SHAPES, ws)])
            pk = ms(lambda: [torch.ops.mkldnn._linear_pointwise(xs[k], p, None, "none", [], "")
                             for (_, k), p in zip(SHAPES, packed)])
        print(f"   {str(dt):<15} F.linear {plain:7.1f}   oneDNN packed {pk:7.1f}   ({plain / pk:.2f}x)")

    print("2. layer matmuls of 30 layers by batch (ms)")
    w32 = [q4_like(n, k) for n, k in SHAPES]
    i4 = [lossless_int4(w) for w in w32]
    assert all(p is not None for p in i4)
    i8 = [((w / (s := w.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8), s[:, 0].bfloat16()) for w in w32]
    bf = [pack(w.bfloat16()) for w in w32]
    for m in (1, 4, 8, 16, 64):
        xs = {k: torch.randn(m, k).bfloat16() for _, k in SHAPES}
        with torch.inference_mode():
            a = ms(lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(xs[k], p, GROUP, sz)
                            for (_, k), (p, sz) in zip(SHAPES, i4)])
            b = ms(lambda: [torch.ops.aten._weight_int8pack_mm(xs[k], q, s) for (_, k), (q, s) in zip(SHAPES, i8)])
            c = ms(lambda: [torch.ops.mkldnn._linear_pointwise(xs[k], p, None, "none", [], "")
                            for (_, k), p in zip(SHAPES, bf)])
        print(f"   batch {m:<3} int4 {a:7.2f}   int8 {b:7.2f}   bf16 packed {c:7.2f}")

    print("3. decode attention of one layer, GQA 9:3, head_dim 64, KV cache 1 GiB bf16 (ms)")
    kern = kernels.load()
    H, KVH, Dh, bs, B = 9, 3, 64, 16, 64
    NB = 2**30 // (2 * KVH * Dh * bs * 2)
    kc, vc = torch.randn(NB, KVH, Dh, bs).bfloat16(), torch.randn(NB, KVH, bs, Dh).bfloat16()
    for S in (64, 128, 256):
        nbt = S // bs
        tab = (torch.randperm(NB - 1)[:B * nbt] + 1).view(B, nbt)                   # scattered blocks
        ctx = torch.full((B,), S)
        qkv = torch.randn(B, (H + 2 * KVH) * Dh).bfloat16()
        f = torch.rand(B, Dh // 2)
        cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([-f.sin(), f.sin()], -1)
        mask = torch.zeros(B, 1, S)
        slot_b, slot_o = tab[:, -1], torch.full((B,), bs - 1)

        def torch_ops():
            qk = TM._rope(qkv[:, :(H + KVH) * Dh].view(B, 1, H + KVH, Dh), cos.bfloat16().view(B, 1, 1, Dh),
                          sin.bfloat16().view(B, 1, 1, Dh))
            kc[slot_b, :, :, slot_o] = qk[:, 0, H:]
            vc[slot_b, :, slot_o] = qkv[:, (H + KVH) * Dh:].view(B, KVH, Dh)
            k_ctx = kc[tab].permute(0, 2, 3, 1, 4).reshape(B, KVH, Dh, -1)
            v_ctx = vc[tab].permute(0, 2, 1, 3, 4).reshape(B, KVH, -1, Dh)
            return TM._attention(qk[:, :, :H], k_ctx, v_ctx, mask, Dh ** -0.5)
        with torch.inference_mode():
            a = ms(lambda: kern.decode_attention(qkv, cos, sin, kc, vc, tab, ctx, H, bs, Dh ** -0.5), 20)
            b = ms(torch_ops, 20)
        print(f"   context {S:<4} kernel {a:6.3f}   torch ops {b:6.3f}   ({b / a:.1f}x)")


if __name__ == "__main__":
    main()
