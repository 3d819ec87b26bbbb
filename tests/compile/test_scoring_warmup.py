"""--warmup-scoring: warmup builds a score graph beside every prefill graph, so a served jax engine with the
no-compile guard armed answers prompt logprobs (echo) and embeddings over HTTP with zero compiles while serving,
its numbers those of transformers float32 on the same tiny weights; without the flag the same requests are
refused with 400 naming it, and nothing compiles either."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.llm import build_engine
from tests.entrypoints.serving import Servers, post_json, wait_idle
from tests.tiny import load_hf, save_tiny_model

SETTINGS = dict(max_model_len=64, max_num_seqs=1, max_num_batched_tokens=16, num_blocks=32, backend="jax",
                dtype="float32", compile_workers=2, warmup=True,        # build_engine warms up: guard armed
                buckets=dict(prompt_bs=(1, 1, 1), prompt_seq=(16, 16, 16), decode_bs=(1, 1, 1),
                             decode_blocks=(4, 4, 4)))                 # 5 graphs (4 without scoring)
IDS = [int(t) for t in np.random.default_rng(5).integers(0, 256, 40)]   # three prefill chunks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama-tied")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def post(base, path, body):
    return post_json(base + path, body, timeout=120)


def serve(model_dir, **kw):
    ae = AsyncEngine(build_engine(str(model_dir), **SETTINGS, **kw))
    return ae, Servers(ae, grpc=False, http=True, model_name="m")


def test_scoring_graphs_serve_without_compiling(model_dir, cache):
    hf = load_hf(model_dir)
    with torch.no_grad():
        out = hf(torch.tensor([IDS]), output_hidden_states=True)
    h = out.hidden_states[-1][0].double().numpy()                          # [T, D] after the final norm
    ref_lp = torch.log_softmax(out.logits[0].double(), -1).numpy()         # [T, V]
    ae, s = serve(model_dir, warmup_scoring=True)
    try:
        runner = ae.engine.runner
        assert runner.guard.armed and not runner.guard.allow_lazy
        prefill = {k for k in runner.executables if k.kind == "prefill"}
        score = {k for k in runner.executables if k.kind == "score"}
        assert prefill and {(k.batch, k.size) for k in score} == {(k.batch, k.size) for k in prefill}
        for pooling, want in (("last", h[-1]), ("mean", h.mean(0))):
            st, r = post(s.base, "/v1/embeddings", {"input": [IDS], "pooling": pooling})
            assert st == 200, r
            np.testing.assert_allclose(r["data"][0]["embedding"], want / np.linalg.norm(want), atol=1e-4)
        st, r = post(s.base, "/v1/completions", {"prompt": IDS, "echo": True, "logprobs": 1, "max_tokens": 0})
        assert st == 200, r
        got = np.array(r["choices"][0]["logprobs"]["token_logprobs"][1:])
        assert np.abs(got - ref_lp[np.arange(len(IDS) - 1), IDS[1:]]).max() < 1e-3
        st, r = post(s.base, "/v1/completions", {"prompt": IDS, "max_tokens": 3, "temperature": 0})
        assert st == 200
        wait_idle(ae)
        assert runner.stats().compiles_while_serving == 0
    finally:
        s.close()
        ae.shutdown()


def test_without_the_flag_they_are_refused(model_dir, cache):
    ae, s = serve(model_dir)                                  # the graph cache holds the graphs: a fast warmup
    try:
        assert not any(k.kind == "score" for k in ae.engine.runner.executables)
        for path, body in (("/v1/embeddings", {"input": "hello"}),
                           ("/v1/completions", {"prompt": "hello", "echo": True, "logprobs": 1, "max_tokens": 0})):
            st, r = post(s.base, path, body)
            assert st == 400 and "--warmup-scoring" in r["error"]["message"], r
        assert ae.engine.runner.stats().compiles_while_serving == 0
    finally:
        s.close()
        ae.shutdown()
