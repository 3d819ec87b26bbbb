"""Prompt logprobs on the default model (float32, the jax backend) against transformers float32 on the same
weights, within 1e-3: through the engine with the prompt split into prefill chunks (a 16-token budget) and
again on a prompt whose prefix is cached (prompt-logprob requests skip the prefix cache and recompute it), and
through /v1/completions with echo + logprobs + max_tokens 0 (the lm-eval-harness loglikelihood request)."""
from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.sampling_params import SamplingParams
from tests.entrypoints.serving import Servers, wait_idle

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
          "capital of Germany.")


@pytest.fixture(scope="module")
def engine(default_gguf):
    from kiln.engine.llm import build_engine
    return build_engine(str(default_gguf), dtype="float32", backend="jax", max_model_len=256, max_num_seqs=4,
                        max_num_batched_tokens=16, warmup=False)


@pytest.fixture(scope="module")
def reference(default_hf_dir, engine):
    from transformers import AutoModelForCausalLM
    ids = engine.tokenizer.encode(PROMPT)
    m = AutoModelForCausalLM.from_pretrained(str(default_hf_dir), dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), -1).numpy()   # [T, V]
    return ids, lp


def run(eng, ids, sp):
    rid = eng.add_request(ids, sp)
    while True:
        for o in eng.step():
            if o.request_id == rid and o.finished:
                return o


def test_chunked_and_cached_prompts_match_transformers(engine, reference):
    ids, ref = reference
    assert len(ids) > 16                           # two prefill chunks at least
    for _ in range(2):                             # the second time its blocks are in the prefix cache
        out = run(engine, ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))
        plp = out.prompt_logprobs
        assert plp[0] is None and len(plp) == len(ids)
        got = np.array([plp[p][ids[p]] for p in range(1, len(ids))])
        want = ref[np.arange(len(ids) - 1), ids[1:]]
        assert np.abs(got - want).max() < 1e-3
        for p in (1, len(ids) // 2, len(ids) - 1):  # the top-3 are transformers' top-3
            want_top = np.argsort(-ref[p - 1])[:3]
            assert set(want_top.tolist()) <= set(plp[p])
            for t in want_top:
                assert abs(plp[p][int(t)] - ref[p - 1, t]) < 1e-3


def test_echo_logprobs_max_tokens_zero_over_http(engine, reference):
    ids, ref = reference
    ae = AsyncEngine(engine)
    s = Servers(ae, grpc=False, http=True, model_name=MODEL)
    try:
        c = openai.OpenAI(base_url=f"{s.base}/v1", api_key="none", max_retries=0, timeout=600)
        r = c.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
        ch = r.choices[0]
        assert ch.text == PROMPT
        lp = ch.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
        got = np.array(lp.token_logprobs[1:])
        assert np.abs(got - ref[np.arange(len(ids) - 1), ids[1:]]).max() < 1e-3
        r = c.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=0, max_tokens=2, temperature=0)
        assert r.choices[0].text.startswith(PROMPT) and len(r.choices[0].logprobs.tokens) == len(ids) + 2
        wait_idle(ae)
    finally:
        s.close()
        ae.shutdown()


def test_refused_at_admission_when_serving_forbids_compiles(engine):
    """A served engine (warmed up, guard armed, no lazy compiles) never compiles the scoring graph mid-step: the
    request is a ValueError (400) naming the flag that allows it, before it is queued."""
    guard = engine.runner.guard
    saved = guard.armed, guard.allow_lazy
    guard.armed, guard.allow_lazy = True, False
    try:
        with pytest.raises(ValueError, match="prompt_logprobs is not available: .*--allow-lazy-compile"):
            engine.add_request([1, 2, 3], SamplingParams(max_tokens=1, prompt_logprobs=0))
        assert not engine.has_unfinished()
    finally:
        guard.armed, guard.allow_lazy = saved
