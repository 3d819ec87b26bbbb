"""`kiln serve` end to end on the real default model: gRPC streams and the HTTP API over one ServingCore give
what the synchronous engine gives (greedy), and a `kiln serve` process serving both drains on SIGTERM (in-flight
requests finish, new ones are refused) and exits 0. Everything else about the servers runs on the mock engine
(tests/entrypoints)."""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints.client import KilnClient
from tests.entrypoints.serving import Servers, serve_process, wait_idle

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPTS = [f"Question {i}: name one thing that is {c}." for i, c in
           enumerate(["red", "blue", "green", "cold", "hot", "soft", "loud", "tiny"])]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def engine(default_gguf):
    from kiln.engine.llm import build_engine

    eng = build_engine(str(default_gguf), dtype="float32", max_model_len=512, max_num_seqs=8, warmup=False)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    ids = [eng.add_request(p, sp) for p in PROMPTS] + [eng.add_request(eng.tokenizer.apply_chat_template(CHAT), sp)]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o for o in eng.step() if o.finished})
    ae = AsyncEngine(eng)
    ae.refs = [done[i].outputs[0] for i in ids]
    yield ae
    ae.shutdown()


@pytest.fixture(scope="module")
def servers(engine):
    s = Servers(engine, http=True, model_name=MODEL)
    yield s
    s.close()


def test_grpc_streams_match_the_engine(servers, engine):
    def run(i):
        with KilnClient(servers.target) as c:
            text, toks, last = "", [], None
            for d in c.generate(PROMPTS[i], temperature=0.0, max_tokens=MAX_TOKENS, timeout=120):
                text, toks, last = text + d.text, toks + list(d.token_ids), d
            return text, toks, last

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(run, range(len(PROMPTS))))
    for (text, toks, last), ref in zip(results, engine.refs):
        assert toks == ref.token_ids and text == ref.text and last.finish_reason == ref.finish_reason
        assert last.usage.completion_tokens == len(ref.token_ids)
    wait_idle(engine)


def test_http_matches_the_engine(servers, engine):
    c = openai.OpenAI(base_url=f"{servers.base}/v1", api_key="none", max_retries=0, timeout=120)
    r = c.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=MAX_TOKENS, temperature=0)
    assert [ch.text for ch in r.choices] == [ref.text for ref in engine.refs[:3]]
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == engine.refs[-1].text
    assert "Paris" in r.choices[0].message.content
    wait_idle(engine)


def test_sigterm_drains_both_transports_and_exits_zero(default_gguf):
    args = ["--model", str(default_gguf), "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "2",
            "--port", "0", "--http-port", "0", "--served-model-name", "smol", "--drain-seconds", "60"]
    with serve_process(args, r"listening on 127\.0\.0\.1:(\d+)") as (proc, port, lines):
        target = f"127.0.0.1:{port}"
        http_port = int(next(x for x in lines if "HTTP API on" in x).rsplit(":", 1)[1].split("/")[0])
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0, timeout=60)
        first = threading.Barrier(2, timeout=60)

        def grpc_stream():
            with KilnClient(target) as c:
                toks, last = [], None
                for d in c.generate("Hello there", temperature=0.0, max_tokens=40, ignore_eos=True, timeout=120):
                    if not toks:
                        first.wait()
                    toks += d.token_ids
                    last = d
                return last.finish_reason, len(toks)

        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(grpc_stream)
            stream = iter(http.completions.create(model="smol", prompt="Once upon a time", max_tokens=40,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                  stream_options={"include_usage": True}))
            next(stream)
            first.wait()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with KilnClient(target) as c:
                with pytest.raises(grpc.RpcError) as e:
                    list(c.generate("too late", max_tokens=2, timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(openai.InternalServerError) as e:
                http.completions.create(model="smol", prompt="too late", max_tokens=2)
            assert e.value.status_code == 503
            usage = [ch.usage for ch in stream if ch.usage]
            assert usage and usage[0].completion_tokens == 40
            assert fut.result(120) == ("length", 40)
        assert proc.wait(60) == 0, "".join(lines)
        assert any("draining" in line for line in lines)
