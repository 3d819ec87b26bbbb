"""The second built-in model, Gemma 3 270M (Q4_K_M GGUF from its PyPI chunk packages), against transformers.

The reference is transformers float32 on the same GGUF, dequantised by transformers itself and kept as an HF
folder (built once per machine, beside the GGUF). kiln's greedy continuations of a few prompts must equal its
`generate` on both backends in float32; the torch backend's bf16 default must stay close to the float32 logits.
The model interleaves 5 local layers (window 512, RoPE base 1e4) with 1 global one (base 1e6).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln import LLM
from kiln.config import models_dir
from kiln.models.fetch import resolve_model
from tests.backends.test_model_vs_hf import LAZY, hf_greedy, hf_logits, kiln_greedy
from tests.conftest import build_hf_dir
from tests.tiny import load_hf

PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,")
NEW = 16


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    return resolve_model("gemma-3-270m", models_dir())


@pytest.fixture(scope="module")
def gemma_hf(gemma_gguf):
    out = models_dir() / "gemma-3-270m-hf"
    if not (out / "model.safetensors").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".gemma-3-270m-hf-", dir=out.parent))
        try:
            build_hf_dir(gemma_gguf, tmp)
            tmp.chmod(0o755)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_hf(out)


@pytest.fixture(scope="module")
def references(gemma_gguf, gemma_hf):
    llm = LLM(model="gemma-3-270m", backend="jax", dtype="float32", max_model_len=128, kv_cache_gib=0.05,
              max_num_seqs=4, **LAZY)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    want = [hf_greedy(gemma_hf, p, NEW) for p in prompts]
    return llm, prompts, want


@pytest.mark.slow
def test_gemma3_270m_is_fetched_verified_and_read_as_gemma3(gemma_gguf, references):
    llm = references[0]
    with open(gemma_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
    spec = llm.engine.spec
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.head_dim) == ("Gemma3ForCausalLM", 18, 640, 256)
    kinds = [l.attention.window for l in spec.layers]
    assert kinds == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_gemma3_270m_greedy_matches_transformers(references, backend):
    llm, prompts, want = references
    if backend == "torch":
        llm = LLM(model="gemma-3-270m", backend="torch", dtype="float32", max_model_len=128, kv_cache_gib=0.05,
                  max_num_seqs=4, **LAZY)
    tok = llm.tokenizer
    for p, got, ref in zip(prompts, kiln_greedy(llm, prompts, NEW), want):
        assert len(set(ref)) > 3, f"reference continuation {tok.decode(ref)!r} is degenerate"
        assert got == ref, f"{backend}, {tok.decode(p)!r}: kiln {tok.decode(got)!r} != transformers {tok.decode(ref)!r}"


@pytest.mark.slow
def test_gemma3_270m_bf16_default_close_to_float32(references, gemma_hf):
    """The torch backend's CPU default (bf16 weights, float32 residual): last-position logits of a prompt within
    5% of their range of transformers' float32 ones, same argmax."""
    from kiln.models.loader import load_model
    from tests.backends.test_torch_backend import TorchForward

    llm, prompts, _ = references
    spec, ids = llm.engine.spec, prompts[0]
    loaded = load_model("gemma-3-270m", models_dir())
    fwd = TorchForward(spec, loaded.tensors, torch.bfloat16)
    got = fwd.step([(ids, 0)])[0]
    ref = hf_logits(gemma_hf, ids)[-1]
    err = np.max(np.abs(got - ref)) / (np.max(ref) - np.min(ref))
    assert err < 0.05 and got.argmax() == ref.argmax(), f"bf16 off by {err:.3f} of the logit range"
