"""GGUF block formats kept quantised by the torch backend (backends/torch/quant.py, csrc/quant.cpp).

The references are the `gguf` package's own quantiser and dequantiser and float64 numpy: the blocks kiln
recovers from a dequantised tensor must be the file's blocks (the same bytes, for the symmetric formats) and
dequantise to gguf's float32 values bit for bit; the kernel's products must equal float64 products of those
weights with the activations (float32 ones, or llama.cpp's int8 rounding of them, reproduced here in numpy)
within float32 summation error; a tiny Llama written as a GGUF with Q8_0 / Q5_0 / Q4_1 layers must generate
transformers' float32 greedy tokens on the dequantised weights.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from kiln.backends.torch import kernels
from kiln.backends.torch.quant import FORMATS, recover
from kiln.backends.torch.weights import QUANT_M, Linear, load_weights

TYPES = {"q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1, "q8_0": QT.Q8_0}
AFFINE = ("q4_1", "q5_1")          # blocks with a stored min (d and m are 2 + 2 bytes)


def gguf_weights(fmt: str, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the file's blocks uint8 [n, k/32, bytes], their float32 dequantisation [n, k]) of a random weight."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 0.2, (n, 1))).astype(np.float32)
    w[0, :32] += 0.5                                                   # one block off-centre (affine: min != -max)
    q = quantize(w, TYPES[fmt])
    return q.reshape(n, k // 32, -1), np.asarray(dequantize(q, TYPES[fmt]), np.float32).reshape(n, k)


def block_d_m(fmt: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block d and m (w = d u + m) read from the GGUF bytes: float64 [n, k/32] each."""
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    if fmt in AFFINE:
        return d, blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    return d, -FORMATS[fmt][2] * d


def kiln_bytes(qw) -> np.ndarray:
    """kiln's blocks laid out as GGUF lays a block (d, [m], [qh], codes)."""
    N, K = qw.shape
    parts = [qw.d.numpy().view(np.uint8).reshape(N, K // 32, 2)]
    if qw.m is not None:
        parts.append(qw.m.numpy().view(np.uint8).reshape(N, K // 32, 2))
    if qw.qh is not None:
        parts.append(qw.qh.numpy().view(np.uint8).reshape(N, K // 32, 4))
    parts.append(qw.codes.numpy().view(np.uint8).reshape(N, K // 32, -1))
    return np.concatenate(parts, -1)


@pytest.mark.parametrize("fmt", sorted(TYPES))
def test_recovered_blocks_dequantise_to_gguf_bit_for_bit(fmt):
    blocks, deq = gguf_weights(fmt, 37, 96)
    qw = recover(torch.from_numpy(deq))
    assert qw is not None and qw.fmt == fmt and qw.shape == (37, 96)
    got = qw.dequantize().numpy()
    assert np.array_equal(got.view(np.uint32), deq.view(np.uint32))      # every bit, the sign of zero included
    if fmt not in AFFINE:      # d is the block's extreme over a fixed integer: the file's bytes exactly
        assert np.array_equal(kiln_bytes(qw), blocks)
    assert qw.nbytes == blocks.nbytes                                     # as many bytes as the file's blocks


def test_only_exact_block_tensors_are_kept():
    _, deq = gguf_weights("q4_0", 8, 64)
    assert recover(torch.from_numpy(deq)).fmt == "q4_0"
    bad = deq.copy()
    bad[5, 40] += 1e-3                                                    # one value off the block's grid
    assert recover(torch.from_numpy(bad)) is None
    dense = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    assert recover(dense) is None                                         # a float checkpoint stays dense
    assert recover(torch.from_numpy(gguf_weights("q8_0", 8, 64)[1][:, :48].copy())) is None   # K % 32 != 0


def int8_rows(x: np.ndarray) -> np.ndarray:
    """llama.cpp's activation rounding (quantize_row_q8_0), float32 as the kernel computes it: per block of
    32, s = amax / 127, a = round-half-even(x * (1 / s)). Returns (a int8 [M, K], s float32 [M, K/32])."""
    M, K = x.shape
    b = x.reshape(M, K // 32, 32)
    s = np.abs(b).max(-1) / np.float32(127)
    inv = np.where(s != 0, np.float32(1) / np.where(s != 0, s, 1), 0).astype(np.float32)
    return np.rint(b * inv[..., None]).astype(np.int8).reshape(M, K), s


@pytest.mark.parametrize("fmt", sorted(TYPES))
@pytest.mark.parametrize("int8_act", [True, False])
def test_kernel_matmul_matches_float64(fmt, int8_act):
    """Odd shapes: 37 output rows, 1..9 activation rows (not a multiple of the kernel's 4), 3 and 17 blocks."""
    assert kernels.load_quant() is not None
    rng = np.random.default_rng(1)
    for k in (96, 544):
        blocks, deq = gguf_weights(fmt, 37, k, seed=k)
        qw = recover(torch.from_numpy(deq))
        d, m = block_d_m(fmt, blocks)
        for M in (1, 3, 5, 9):
            x = rng.standard_normal((M, k)).astype(np.float32)
            if int8_act:
                a, s = int8_rows(x)
                got_a, got_s, got_sa = kernels.load_quant().quantize_rows(torch.from_numpy(x))
                assert np.array_equal(got_a.numpy(), a) and np.array_equal(got_s.numpy(), s)
                xr = (a.reshape(M, -1, 32) * s[..., None].astype(np.float64)).reshape(M, k)
            else:
                xr = x.astype(np.float64)
            ref = xr @ deq.astype(np.float64).T                                          # [M, N]
            # the kernel sums d * (u . x) + m * sum(x) per block: bound its float32 error by those terms' sizes
            um = np.abs(deq.astype(np.float64) - np.repeat(m, 32, 1)) + np.abs(np.repeat(m, 32, 1))
            bound = np.abs(xr) @ um.T
            got = qw(torch.from_numpy(x), int8_act=int8_act).numpy()
            assert got.shape == (M, 37)
            assert np.all(np.abs(got - ref) <= 2e-6 * bound * (k // 32) + 1e-30), (fmt, k, M)


def test_linear_uses_the_blocks_below_the_crossover_and_dense_above():
    _, deq = gguf_weights("q5_0", 40, 64)
    w = torch.from_numpy(deq)
    bias = torch.randn(40)
    q = recover(w)
    q.int8_act = False                 # float32 activations: the products within float32 rounding of float64's
    lin = Linear.of(w.clone(), bias, quant=q)
    x = torch.randn(QUANT_M + 1, 64)
    small = lin(x[:3])
    assert torch.equal(small, lin.quant(x[:3]) + bias)
    ref = x.double() @ w.double().T + bias.double()
    assert torch.allclose(small.double(), ref[:3], atol=1e-4)
    assert torch.allclose(lin(x).double(), ref, atol=1e-4)                # dense oneDNN (no blocks used)
    assert lin.bytes_read(1) == lin.quant.nbytes < lin.bytes_read(QUANT_M) == w.nbytes
    blocks = Linear.of(None, bias, quant=q)                               # no dense copy: blocks at every size
    assert torch.equal(blocks(x), blocks.quant(x) + bias) and torch.allclose(blocks(x).double(), ref, atol=1e-4)
    assert blocks.bytes_read(QUANT_M) == blocks.resident_bytes - bias.nbytes == blocks.quant.nbytes


# ---- end to end: a tiny Llama as a GGUF with block-quantised layers ----
LAYER_TYPES = {"attn_q": QT.Q8_0, "attn_k": QT.Q8_0, "attn_v": QT.Q8_0, "attn_output": QT.Q8_0,
               "ffn_gate": QT.Q5_0, "ffn_up": QT.Q5_0, "ffn_down": QT.Q4_1}


def write_quant_llama(path, folder) -> dict[str, np.ndarray]:
    """The tiny HF llama as a llama.cpp-named GGUF, layer projections quantised per LAYER_TYPES; returns the HF
    tensors with those projections replaced by gguf's dequantisation of their blocks."""
    from gguf.constants import MODEL_ARCH

    from kiln.models.safetensors_loader import load_hf_folder
    from kiln.models.spec import ModelSpec
    from tests.models.test_gguf_loader import llama_cpp_permute, write_dims
    from tests.models.test_gguf_moe import _write_tokenizer
    cfg, hf = load_hf_folder(folder)
    ref = ModelSpec.from_hf_config(cfg)
    names = gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, ref.num_layers)
    w = gguf.GGUFWriter(str(path), "llama")
    write_dims(w, ref)
    w.add_key_length(ref.head_dim)
    w.add_rope_freq_base(ref.layers[0].attention.rope.theta)
    _write_tokenizer(w)
    out = {}
    for k, v in hf.items():
        base, suffix = k.rsplit(".", 1)
        g = names.get_name(base)
        v = np.ascontiguousarray(v, np.float32)
        qt = LAYER_TYPES.get(g.split(".")[-1]) if suffix == "weight" else None
        if qt is not None:     # row-wise blocks: quantising commutes with llama.cpp's Q/K row permutation
            q = quantize(v, qt)
            v_deq = np.asarray(dequantize(q, qt), np.float32).reshape(v.shape)
            out[k] = v_deq
            if g.endswith((".attn_q", ".attn_k")):
                v_deq = llama_cpp_permute(v_deq, ref.num_heads, ref.num_kv_heads if g.endswith("_k") else None)
            w.add_tensor(f"{g}.{suffix}", quantize(v_deq, qt), raw_dtype=qt)
        else:
            out[k] = v
            w.add_tensor(f"{g}.{suffix}", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_quantised_llama_gguf_greedy_matches_transformers(tmp_path):
    from kiln import LLM, SamplingParams
    from tests.backends.test_model_vs_hf import hf_greedy, hf_logits, prompt
    from tests.backends.test_torch_backend import TorchForward
    from tests.tiny import load_hf, save_tiny_model

    folder = save_tiny_model(tmp_path / "hf", "llama-tied")
    deq = write_quant_llama(tmp_path / "m.gguf", folder)
    hf = load_hf(folder)
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in deq.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}          # tied: the head is the embedding
    llm = LLM(model=str(tmp_path / "m.gguf"), backend="torch", dtype="float32", max_model_len=64,
              kv_cache_gib=0.01, max_num_seqs=2, warmup=False, allow_lazy_compile=True, quantization="exact")
    L = llm.engine.spec.num_layers
    assert llm.engine.runner.params.quant_formats() == {"q8_0": 2 * L, "q5_0": L, "q4_1": L}
    assert not any(q.int8_act for q in quant_weights(llm.engine.runner.params))     # exact: float32 activations
    prompts = [prompt(n, 258, seed=3) for n in (4, 21)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for p, o in zip(prompts, outs):
        want = hf_greedy(hf, p, 8)
        assert len(set(want)) > 2, want
        assert o.outputs[0].token_ids == want, f"kiln {o.outputs[0].token_ids} != transformers {want}"
    # the default method (llama.cpp's: activations rounded to int8 per block of 32, a relative error of at
    # most 1/254 of each block's largest |x|): float32, every block format; bf16, where ATen's int4 serves
    # the Q4_1 ones. A one-token decode step's logits within 2% (float32) / 5% (bf16: bf16 weights and
    # activations elsewhere) of their range of float32 transformers', the same argmax.
    ids = prompts[1]
    ref = hf_logits(hf, ids)[-1]
    for dtype, formats, tol in ((torch.float32, {"q8_0": 2 * L, "q5_0": L, "q4_1": L}, 0.02),
                                (torch.bfloat16, {"q8_0": 2 * L, "q5_0": L}, 0.05)):
        fwd = TorchForward(llm.engine.spec, {k: v for k, v in deq.items()}, dtype, int4=True)
        assert fwd.w.quant_formats() == formats and all(q.int8_act for q in quant_weights(fwd.w))
        fwd.step([(ids[:-1], 0)])
        got = fwd.step([([ids[-1]], len(ids) - 1)])[0]
        err = np.max(np.abs(got - ref)) / (np.max(ref) - np.min(ref))
        assert err < tol and got.argmax() == ref.argmax(), (dtype, err)
    # --quantization blocks: no dense copy beside the blocks; a 21-token prefill (> QUANT_M) runs on them too
    dense_bytes = TorchForward(llm.engine.spec, deq, torch.float32, True).w.resident_bytes
    fwd.w = load_weights(llm.engine.spec, deq, torch.float32, True, 256, dense=False)
    assert all(lin.weight is None and lin.quant is not None for lin in fwd.w.projections())
    assert fwd.w.resident_bytes < dense_bytes - sum(q.nbytes for q in quant_weights(fwd.w)) * 3
    got = fwd.step([(ids, 0)])[0]
    err = np.max(np.abs(got - ref)) / (np.max(ref) - np.min(ref))
    assert err < 0.02 and got.argmax() == ref.argmax(), err


def quant_weights(w) -> list:
    return [lin.quant for lin in w.projections() + [w.head] if lin.quant is not None]
