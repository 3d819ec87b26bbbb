"""The OpenAI-compatible HTTP transport over real loopback sockets, on the mock engine, driven by the official
`openai` client: parity with the synchronous engine, streaming, n > 1, logprobs, stop, usage, OpenAI-shaped errors
(400 naming the field, a bogus chat role included; 401/404/429), a 300-request burst admitted exactly by slots,
aborted streams freeing their blocks, health, metrics, draining and engine death. No gRPC server is involved.

The real model's end-to-end checks are in tests/e2e/test_serving.py.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import openai
import pytest

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.sampling_params import SamplingParams
from tests.entrypoints.serving import Servers, call, wait_idle
from tests.serving.engines import kill_engine, mock_async_engine, mock_llm_engine

MODEL = "mock-model"
KEY = "sk-test"
PROMPTS = ["The capital of France is", "Question: name one thing that is red.", "Once upon a time"]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
MAX_TOKENS = 16


def http(engine: AsyncEngine | None, **opts) -> Servers:
    return Servers(engine, grpc=False, http=True, model_name=MODEL, **opts)


def client(s: Servers, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.base}/v1", api_key=key or "none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine():
    eng = mock_llm_engine(max_num_seqs=4, num_blocks=512)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    jobs = [(p, greedy) for p in PROMPTS] + [(eng.tokenizer.apply_chat_template(CHAT), greedy),
                                             (PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2))]
    ids = [eng.add_request(p, sp) for p, sp in jobs]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o for o in eng.step() if o.finished})
    ae = AsyncEngine(eng)
    ae.refs = [done[i].outputs[0] for i in ids[:3]]
    ae.chat_ref, ae.lp_ref = done[ids[3]].outputs[0], done[ids[4]].outputs[0]
    yield ae
    ae.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    s = http(engine, api_key=KEY)
    yield s
    s.close()


def test_completions_match_engine(server, engine):
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [ref.text for ref in engine.refs]
    assert [ch.finish_reason for ch in r.choices] == [ref.finish_reason for ref in engine.refs]
    n_in = sum(len(engine.tokenizer.encode(p)) for p in PROMPTS)
    n_out = sum(len(ref.token_ids) for ref in engine.refs)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_in, n_out, n_in + n_out)
    r = c.completions.create(model=MODEL, prompt=engine.tokenizer.encode(PROMPTS[1]), max_tokens=MAX_TOKENS,
                             temperature=0, n=2)
    assert [ch.text for ch in r.choices] == [engine.refs[1].text] * 2
    assert r.usage.completion_tokens == 2 * len(engine.refs[1].token_ids)
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2)
    lp, ref = r.choices[0].logprobs, engine.lp_ref
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for got, tok, entry in zip(lp.token_logprobs, ref.token_ids, ref.logprobs):
        assert got == pytest.approx(entry[tok], abs=1e-6)
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    wait_idle(engine)


def test_completions_stream_stop_and_usage(server, engine):
    c = client(server)
    ref = engine.refs[0]
    text, finish, usage = "", None, None
    for chunk in c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                      stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "text_completion"
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert text == ref.text and finish == ref.finish_reason
    assert usage.completion_tokens == len(ref.token_ids)
    cut = ref.text[3:5]                      # a stop string from the reference: cut before its first match
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[cut])
    assert r.choices[0].text == ref.text[:ref.text.index(cut)] and r.choices[0].finish_reason == "stop"
    texts = {0: "", 1: ""}
    for chunk in c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, n=2,
                                      stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert texts == {0: engine.refs[2].text, 1: engine.refs[2].text}
    wait_idle(engine)


def test_chat_completions(server, engine):
    c = client(server)
    ref = engine.chat_ref
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                  logprobs=True, top_logprobs=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    m = r.choices[0].message
    assert m.role == "assistant" and m.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert r.usage.prompt_tokens == len(engine.tokenizer.apply_chat_template(CHAT))
    text, roles, usage = "", [], None
    for chunk in c.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        for ch in chunk.choices:
            text += ch.delta.content or ""
            roles += [ch.delta.role] if ch.delta.role else []
        usage = chunk.usage or usage
    assert text == ref.text and roles == ["assistant"] and usage.completion_tokens == len(ref.token_ids)
    assert [mo.id for mo in c.models.list().data] == [MODEL]
    wait_idle(engine)


def test_errors_are_openai_shaped_and_server_keeps_serving(server, engine):
    c = client(server)
    vocab = engine.engine.spec.vocab_size
    bad = [
        (dict(prompt="hi", max_tokens=0), "max_tokens"),
        (dict(prompt="hi", temperature=-1), "temperature"),
        (dict(prompt="hi", n=0), "n"),
        (dict(prompt="hi", n=500), "n"),                 # more sequences than the server ever admits
        (dict(prompt="hi", top_p=0), "top_p"),
        (dict(prompt="hi", logprobs=50), "logprobs"),
        (dict(prompt="hi", logit_bias={str(vocab + 5): 1}), "logit_bias"),
        (dict(prompt="hi", stop=[""]), "stop"),
        (dict(prompt=[1] * 300), "prompt"),
        (dict(prompt=""), "prompt"),
        (dict(prompt=[1, vocab + 5]), "prompt"),
    ]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, **kwargs)
        assert e.value.status_code == 400
        assert e.value.body["param"] == param, (kwargs, e.value.body)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=[1] * 300)
    assert "max_model_len" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"},
                                                         {"role": "bogus", "content": "x"}])
    assert e.value.body["param"] == "messages[1].role" and "'bogus'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=50)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="hi")
    assert e.value.status_code == 404 and e.value.body["param"] == "model"
    for key in ("wrong", None):
        with pytest.raises(openai.AuthenticationError) as e:
            client(server, key).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    assert server.get("/nope")[0] == 404
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == engine.refs[0].text
    wait_idle(engine)


def test_queue_full_429_and_aborted_streams_free_blocks(engine):
    """max_queued=0 and max_num_seqs=4: four long streams fill the engine, a fifth request gets 429; closing the
    streams early aborts them and frees every block."""
    s = http(engine, max_queued=0, metrics_port=0)
    engine.engine.runner.step_seconds = 0.01
    try:
        c = client(s, None)
        streams = [c.completions.create(model=MODEL, prompt=p, max_tokens=200, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
                   for p in PROMPTS + ["One more"]]
        for st in streams:
            assert next(iter(st)).choices[0].text is not None
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="one too many", max_tokens=2)
        assert e.value.status_code == 429 and "max-queued" in e.value.body["message"]
        assert e.value.body["type"] == "rate_limit_error"
        assert engine.stats()["blocks_used"] > 0
        for st in streams:
            st.close()
        st = wait_idle(engine)
        assert st["blocks_used"] == 0 and st["blocks_free"] == engine.engine.config.cache.num_blocks - 1
        deadline = time.monotonic() + 10
        while s.core.admission.used and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.core.admission.used == 0 and len(s.core.inflight) == 0
        code, text = s.get("/metrics")
        assert code == 200 and "kiln_kv_blocks_used 0.0" in text
        assert 'kiln_requests_total{method="/v1/completions",status="429"} 1.0' in text
        assert 'kiln_requests_total{method="/v1/completions",status="499"} 4.0' in text
        assert "kiln_time_to_first_token_seconds_count 4.0" in text
        r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == engine.refs[0].text
    finally:
        engine.engine.runner.step_seconds = 0.0
        s.close()


async def _post(port: int, body: dict) -> tuple[int, dict]:
    """One POST /v1/completions on its own connection; (status, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_admission_burst_300_counts_n_fan_out():
    """300 concurrent requests of n=2 while the engine is held: max_num_seqs 8 + max_queued 16 = 24 slots, so
    exactly 12 requests get in and 288 get 429 at once; the 12 then finish with 2 choices each."""
    gate = threading.Event()
    ae = mock_async_engine(max_num_seqs=8, num_blocks=512)
    s = http(ae, max_queued=16)
    ae.engine.runner.fault = lambda step: gate.wait(60)     # steps wait: nothing finishes during the burst
    results: list[tuple[int, dict]] = []

    async def burst():
        body = {"model": MODEL, "prompt": "burst", "max_tokens": 4, "temperature": 0, "n": 2}
        tasks = [asyncio.create_task(_post(s.http_port, body)) for _ in range(300)]
        for t in asyncio.as_completed(tasks):
            results.append(await t)
            if len(results) == 288:          # every refusal is in: hold on, then let the engine go
                assert s.core.admission.used == 24
                gate.set()
    try:
        with_timeout = asyncio.wait_for(burst(), 60)
        threading.Thread(target=lambda: (time.sleep(30), gate.set()), daemon=True).start()   # never hang
        asyncio.run(with_timeout)
        codes = [code for code, _ in results]
        assert codes.count(429) == 288 and codes.count(200) == 12, sorted(set(codes))
        assert codes[:288] == [429] * 288                    # refused at once, before any admitted one ended
        assert all(len(b["choices"]) == 2 for code, b in results if code == 200)
        assert all(b["error"]["type"] == "rate_limit_error" for code, b in results if code == 429)
        assert s.core.admission.used == 0
    finally:
        gate.set()
        s.close()
        ae.shutdown()


def test_health_metrics_and_drain(engine):
    s = http(None)
    try:
        assert s.get("/health") == (503, '{"status":"warming up"}')
        with pytest.raises(openai.InternalServerError) as e:   # 503 before the engine is ready
            client(s).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
        s.attach(engine)
        assert s.get("/health") == (200, '{"status":"ok"}')
        client(s).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        code, text = s.get("/metrics")
        assert code == 200 and 'kiln_requests_total{method="/v1/completions",status="200"} 1.0' in text
        assert "kiln_generation_tokens_total" in text and "kiln_kv_blocks_free" in text
        call(s.core.drain(0))
        assert s.get("/health") == (503, '{"status":"draining"}')
        with pytest.raises(openai.InternalServerError) as e:
            client(s).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and "draining" in e.value.body["message"]
    finally:
        s.close()


def test_engine_death_flips_health():
    s = http(None)
    ae = mock_async_engine(on_death=s.core.engine_died)
    try:
        s.attach(ae)
        assert s.get("/health")[0] == 200
        kill_engine(ae)
        with pytest.raises(openai.InternalServerError) as e:
            client(s).completions.create(model=MODEL, prompt="hi", max_tokens=4)
        assert e.value.status_code == 500 and "engine stopped" in e.value.body["message"]
        assert s.get("/health") == (503, '{"status":"engine stopped"}')
        with pytest.raises(openai.InternalServerError) as e:
            client(s).completions.create(model=MODEL, prompt="hi", max_tokens=4)
        assert e.value.status_code == 503
    finally:
        s.close()
        ae.shutdown()
