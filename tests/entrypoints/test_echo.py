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
    wait_idle(servers.engine_)


def _stream(c, **kw) -> tuple[dict[int, list], dict | None]:
    """The streamed choices' chunks by index, and the usage chunk's usage."""
    by_index, usage = {}, None
    for chunk in c.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        for ch in chunk.choices:
            by_index.setdefault(ch.index, []).append(ch)
        if chunk.usage is not None:
            usage = chunk.usage
    return by_index, usage


def _joined(chs) -> dict:
    """The streamed logprobs of one choice put together."""
    return {key: [v for ch in chs if ch.logprobs for v in getattr(ch.logprobs, key)]
            for key in ("tokens", "token_logprobs", "text_offset")}


def test_echo_streams_the_prompt_in_the_first_chunk(servers):
    c = openai.OpenAI(base_url=f"{servers.base}/v1", api_key="none", max_retries=0, timeout=60)
    ids = servers.engine_.tokenizer.encode(PROMPT)
    want_prompt = [None] + [mock_logprob(t) for t in ids[1:]]
    kw = dict(prompt=PROMPT, echo=True, logprobs=1, max_tokens=4, temperature=0)
    whole = c.completions.create(model=MODEL, **kw).choices[0]
    chunks, usage = _stream(c, **kw)
    first = chunks[0][0]
    assert first.text.startswith(PROMPT) and first.logprobs.token_logprobs[:len(ids)] == want_prompt
    assert "".join(ch.text for ch in chunks[0]) == whole.text and chunks[0][-1].finish_reason == "length"
    joined = _joined(chunks[0])
    assert joined == {k: getattr(whole.logprobs, k) for k in joined}
    assert len(joined["tokens"]) == len(ids) + 4 and usage.completion_tokens == 4
    # max_tokens 0: one chunk with the prompt and its logprobs, nothing generated
    chunks, usage = _stream(c, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    (only,) = chunks[0]
    assert only.text == PROMPT and only.finish_reason == "length"
    assert only.logprobs.token_logprobs == want_prompt and only.logprobs.text_offset[0] == 0
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 0)
    # a list of prompts, no logprobs: each choice's first chunk starts with its own prompt
    chunks, _ = _stream(c, prompt=["one", "two"], echo=True, max_tokens=2, temperature=0)
    assert [chunks[i][0].text[:3] for i in (0, 1)] == ["one", "two"]
    assert all(ch.logprobs is None for i in (0, 1) for ch in chunks[i])
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
