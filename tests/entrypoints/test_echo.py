"""`echo` + `logprobs` (with `max_tokens: 0`) on /v1/completions and `prompt_logprobs` on gRPC, on the mock
engine, whose prompt logprobs are hand-computable (mock_logprob of each prompt token after the first)."""
from __future__ import annotations

import json

import openai
import pytest

from kiln.backends.mock import mock_logprob
from kiln.entrypoints import batch as B
from kiln.entrypoints.client import KilnClient
from tests.entrypoints.serving import mock_servers, wait_idle
from tests.mock_engine import mock_engine

MODEL = "mock-model"
PROMPT = "echo me back"


@pytest.fixture(scope="module")
def servers():
    yield from mock_servers(grpc=True, http=True, model_name=MODEL)


def test_echo_with_logprobs_and_max_tokens_zero(servers):
    c = openai.OpenAI(base_url=f"{servers.base}/v1", api_key="none", max_retries=0, timeout=60)
    ids = servers.engine_.tokenizer.encode(PROMPT)
    r = c.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    ch = r.choices[0]
    assert ch.text == PROMPT and len(ch.logprobs.tokens) == len(ids)
    assert ch.logprobs.token_logprobs == [None] + [mock_logprob(t) for t in ids[1:]]
    assert ch.logprobs.top_logprobs[0] is None and ch.logprobs.text_offset[0] == 0
    r = c.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=0, max_tokens=3, temperature=0)
    ch = r.choices[0]
    assert ch.text.startswith(PROMPT) and len(ch.logprobs.tokens) == len(ids) + 3
    assert ch.logprobs.token_logprobs[:len(ids)] == [None] + [mock_logprob(t) for t in ids[1:]]
    assert [None if e is None else e[str(t)]["logprob"] for t, e in zip(ids, ch.model_extra["prompt_logprobs"])] \
        == [None] + [mock_logprob(t) for t in ids[1:]]
    r = c.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=2, temperature=0)
    assert r.choices[0].text.startswith(PROMPT) and r.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt=PROMPT, echo=True, stream=True)
    wait_idle(servers.engine_)


def test_grpc_prompt_logprobs(servers):
    ids = servers.engine_.tokenizer.encode(PROMPT)
    with KilnClient(servers.target) as k:
        reply = k.generate_unary(PROMPT, max_tokens=2, prompt_logprobs=1)
        assert [p.token_id for p in reply.prompt_logprobs] == ids[1:]
        assert [p.logprob for p in reply.prompt_logprobs] == pytest.approx([mock_logprob(t) for t in ids[1:]])
        first = next(iter(k.generate(PROMPT, max_tokens=2, prompt_logprobs=0)))
        assert [p.token_id for p in first.prompt_logprobs] == ids[1:]


def test_batch_echo_line(tmp_path):
    eng = mock_engine()
    ids = eng.tokenizer.encode(PROMPT)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"custom_id": "e", "url": "/v1/completions", "body": {
        "prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 0}}) + "\n")
    B.run_batch(eng, str(inp), tmp_path / "out.jsonl", progress=False)
    (rec,) = map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
    ch = rec["response"]["body"]["choices"][0]
    assert ch["text"] == PROMPT and ch["logprobs"]["token_logprobs"][1:] == [mock_logprob(t) for t in ids[1:]]
