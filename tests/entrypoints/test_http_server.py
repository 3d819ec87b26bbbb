"""The OpenAI-compatible HTTP API over real loopback sockets, driven by the official `openai` client: parity with
the synchronous engine (greedy), streaming, n > 1, logprobs, stop, usage, OpenAI-shaped errors (400/401/404/429),
aborted streams freeing their blocks, health and metrics.

One engine (the default model, float32, max_model_len 512) is built once for the module; references come from it
before the AsyncEngine thread owns it. Servers run on one asyncio loop on a background thread.
"""
from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.sampling_params import SamplingParams
from tests.entrypoints.serving import serve_process, server_loop, wait_idle
from kiln.entrypoints.grpc_server import KilnServer, ServeOptions
from kiln.entrypoints.http_server import HttpServer, param_of

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
KEY = "sk-test"
PROMPTS = ["The capital of France is", "Question: name one thing that is red.", "Once upon a time"]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
MAX_TOKENS = 16

def _call(coro, timeout: float = 120):
    return asyncio.run_coroutine_threadsafe(coro, server_loop()).result(timeout)


class HttpThread:
    """A KilnServer with no gRPC port and its HTTP API, on the shared test loop."""

    def __init__(self, engine: AsyncEngine | None, **opts):
        self.kiln = KilnServer(ServeOptions(port=None, http_port=0, **opts))
        _call(self.kiln.start())
        self.http = HttpServer(self.kiln)
        self.port = _call(self.http.start())
        self.base = f"http://127.0.0.1:{self.port}"
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: AsyncEngine) -> None:
        self.kiln.attach(engine, MODEL)
        _call(self.kiln.warmup())

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def close(self) -> None:
        _call(self.http.stop())
        _call(self.kiln.stop(0.5))


@pytest.fixture(scope="module")
def engine(default_gguf):
    from kiln.engine.llm import build_engine

    eng = build_engine(str(default_gguf), dtype="float32", max_model_len=512, max_num_seqs=4, warmup=False)
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
    s = HttpThread(engine, api_key=KEY)
    yield s
    s.close()


def test_completions_match_engine(server, engine):
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [ref.text for ref in engine.refs]
    assert [ch.finish_reason for ch in r.choices] == [ref.finish_reason for ref in engine.refs]
    n_in = sum(len(engine.tokenizer.encode(p)) for p in PROMPTS)
    n_out = sum(len(ref.token_ids) for ref in engine.refs)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_in, n_out, n_in + n_out)
    # token ids as the prompt, and n > 1 (greedy: every sample is the reference)
    r = c.completions.create(model=MODEL, prompt=engine.tokenizer.encode(PROMPTS[1]), max_tokens=MAX_TOKENS,
                             temperature=0, n=2)
    assert [ch.text for ch in r.choices] == [engine.refs[1].text] * 2
    assert r.usage.completion_tokens == 2 * len(engine.refs[1].token_ids)
    # logprobs: top-2 per token, the sampled token's logprob as the engine computed it
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    ref = engine.lp_ref
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for got, tok, entry in zip(lp.token_logprobs, ref.token_ids, ref.logprobs):
        assert got == pytest.approx(entry[tok], abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    wait_idle(engine)


def test_completions_stream_stop_and_usage(server, engine):
    c = server.client()
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
    # stop: cut at the first occurrence of a word of the reference, not included
    word = ref.text.split()[2]
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[word])
    assert r.choices[0].text == ref.text[:ref.text.index(word)]
    assert r.choices[0].finish_reason == "stop"
    # streaming n=2: every choice index gets its own deltas
    texts = {0: "", 1: ""}
    for chunk in c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, n=2,
                                      stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert texts == {0: engine.refs[2].text, 1: engine.refs[2].text}
    wait_idle(engine)


def test_chat_completions(server, engine):
    c = server.client()
    ref = engine.chat_ref
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                  logprobs=True, top_logprobs=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    m = r.choices[0].message
    assert m.role == "assistant" and m.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == len(engine.tokenizer.apply_chat_template(CHAT))
    # streaming, with max_completion_tokens and usage
    text, roles, usage = "", [], None
    for chunk in c.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        for ch in chunk.choices:
            text += ch.delta.content or ""
            roles += [ch.delta.role] if ch.delta.role else []
        usage = chunk.usage or usage
    assert text == ref.text and roles == ["assistant"] and usage.completion_tokens == len(ref.token_ids)
    models = c.models.list().data
    assert [mo.id for mo in models] == [MODEL]
    wait_idle(engine)


def test_errors_are_openai_shaped_and_server_keeps_serving(server, engine):
    c = server.client()
    vocab = engine.engine.spec.vocab_size
    bad = [
        (dict(prompt="hi", max_tokens=0), "max_tokens"),
        (dict(prompt="hi", temperature=-1), "temperature"),
        (dict(prompt="hi", n=0), "n"),
        (dict(prompt="hi", top_p=0), "top_p"),
        (dict(prompt="hi", logprobs=50), "logprobs"),
        (dict(prompt="hi", logit_bias={str(vocab + 5): 1}), "logit_bias"),
        (dict(prompt="hi", stop=[""]), "stop"),
        (dict(prompt=[1] * 600), "prompt"),
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
        c.completions.create(model=MODEL, prompt=[1] * 600)
    assert "max_model_len" in e.value.body["message"]
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
            server.client(key).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == engine.refs[0].text
    wait_idle(engine)


def test_param_of():
    assert param_of("max_tokens must be at least 1, got 0.") == "max_tokens"
    assert param_of("prompt is 600 tokens; max_model_len is 512") == "prompt"
    assert param_of("prompt is empty", chat=True) == "messages"
    assert param_of("messages[0].content must be a string") == "messages"
    assert param_of("the engine is still warming up") is None


def test_queue_full_429_and_aborted_streams_free_blocks(engine):
    """max_queued=0 and max_num_seqs=4: four long streams fill the engine, a fifth request gets 429; closing the
    streams early aborts them and frees every block."""
    s = HttpThread(engine, max_queued=0)
    try:
        c = s.client(None)
        streams = [c.completions.create(model=MODEL, prompt=p, max_tokens=400, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
                   for p in PROMPTS + ["One more"]]
        for st in streams:
            assert next(iter(st)).choices[0].text is not None
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="one too many", max_tokens=2)
        assert e.value.status_code == 429 and "max-queued" in e.value.body["message"]
        assert engine.stats()["blocks_used"] > 0
        for st in streams:
            st.close()
        st = wait_idle(engine)
        assert st["blocks_used"] == 0 and st["blocks_free"] == engine.engine.config.cache.num_blocks - 1
        code, text = s.get("/metrics")
        assert code == 200 and "kiln_kv_blocks_used 0.0" in text
        assert 'kiln_requests_total{method="/v1/completions",status="429"} 1.0' in text
        assert 'kiln_requests_total{method="/v1/completions",status="499"} 4.0' in text
        assert "kiln_time_to_first_token_seconds_count 4.0" in text
        r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == engine.refs[0].text
    finally:
        s.close()


def test_health_metrics_and_drain(engine):
    s = HttpThread(None)
    try:
        assert s.get("/health")[0] == 503
        with pytest.raises(openai.InternalServerError) as e:   # 503 before the engine is ready
            s.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
        s.attach(engine)
        assert s.get("/health") == (200, '{"status":"ok"}')
        s.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
        code, text = s.get("/metrics")
        assert code == 200 and 'kiln_requests_total{method="/v1/completions",status="200"} 1.0' in text
        assert "kiln_generation_tokens_total" in text and "kiln_kv_blocks_free" in text
        _call(s.kiln.drain(0))
        assert s.get("/health")[0] == 503
        with pytest.raises(openai.InternalServerError) as e:
            s.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and "draining" in e.value.body["message"]
        assert s.get("/nope")[0] == 404
    finally:
        s.close()


def test_kiln_serve_http_only_drains_on_sigterm(default_gguf):
    """`kiln serve --no-grpc --http-port 0`: an in-flight stream finishes after SIGTERM, new requests get 503,
    the process exits 0."""
    args = ["--model", str(default_gguf), "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "2",
            "--no-grpc", "--http-port", "0", "--served-model-name", "smol", "--drain-seconds", "60"]
    with serve_process(args, r"HTTP API on http://127\.0\.0\.1:(\d+)/v1") as (proc, port, lines):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["smol"]
        stream = c.completions.create(model="smol", prompt="Hello there", max_tokens=40, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        it = iter(stream)
        next(it)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="smol", prompt="too late", max_tokens=2)
        assert e.value.status_code == 503
        usage = [ch.usage for ch in it if ch.usage]
        assert usage and usage[0].completion_tokens == 40
        assert proc.wait(60) == 0, "".join(lines)
        assert any("draining" in line for line in lines)
