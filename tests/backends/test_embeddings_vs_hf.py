"""Embeddings (LLM.embed) on the jax and torch backends, float32, against transformers float32 on the same
tiny random Llama and Qwen2 weights: `hidden_states[-1]` (the final-normed hidden state, checked against
`last_hidden_state`) pooled by the last token or the mean of every position, L2-normalised and not, for a
prompt long enough to be split into prefill chunks (a 16-token budget) beside a short one in the same step.
And torch prompt logprobs, chunked, within 1e-3 of transformers' log_softmax."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln import LLM, PoolingParams, SamplingParams
from tests.tiny import load_hf, save_tiny_model

PROMPTS = [list(np.random.default_rng(3).integers(0, 256, 45)), [7, 100, 33, 21, 250]]
SETTINGS = dict(dtype="float32", max_model_len=128, kv_cache_gib=0.01, max_num_seqs=4, max_num_batched_tokens=16,
                warmup=False, allow_lazy_compile=True)


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2"])
def tiny(request, tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return folder, load_hf(folder)


def hf_hidden(model, ids) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
        base = model.model(torch.tensor([ids])).last_hidden_state
    h = out.hidden_states[-1][0]
    assert torch.equal(h, base[0])                   # the last entry is after the final norm
    return h.double().numpy()                         # [T, D]


def pooled(h: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    v = h[-1] if pooling == "last" else h.mean(0)
    return v / np.linalg.norm(v) if normalize else v


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_embeddings_match_transformers(tiny, backend):
    folder, hf = tiny
    llm = LLM(model=str(folder), backend=backend, **SETTINGS)
    refs = [hf_hidden(hf, [int(t) for t in p]) for p in PROMPTS]
    for pooling in ("last", "mean"):
        for normalize in (True, False):
            outs = llm.embed([[int(t) for t in p] for p in PROMPTS], PoolingParams(pooling, normalize))
            for out, h in zip(outs, refs):
                got, want = np.array(out.outputs.embedding), pooled(h, pooling, normalize)
                assert got.shape == (hf.config.hidden_size,)
                err = np.abs(got - want).max() / (1.0 if normalize else np.abs(want).max())
                assert err < 1e-4, f"{backend} {pooling} normalize={normalize}: {err:.2e}"
    steps = llm.engine.runner.stats()
    assert steps.real_tokens >= 4 * sum(len(p) for p in PROMPTS)      # every position computed every time


def test_torch_prompt_logprobs_match_transformers(tiny):
    folder, hf = tiny
    llm = LLM(model=str(folder), backend="torch", **SETTINGS)
    ids = [int(t) for t in PROMPTS[0]]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()    # [T, V]
    out, = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == len(ids)
    got = np.array([plp[p][ids[p]] for p in range(1, len(ids))])
    assert np.abs(got - ref[np.arange(len(ids) - 1), ids[1:]]).max() < 1e-3
    for p in range(1, len(ids)):
        top = np.argsort(-ref[p - 1])[:3]
        assert set(top.tolist()) <= set(plp[p])
        assert max(abs(plp[p][int(t)] - ref[p - 1, t]) for t in top) < 1e-3
    assert len(out.outputs[0].token_ids) == 2
