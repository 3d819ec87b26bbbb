"""The gRPC transport over real loopback sockets, on the mock engine (fast, outputs computed by hand or by the
synchronous engine): streaming parity with the engine, unary, tokenize/info, logprobs, bad input (a bogus chat
role included), deadlines and cancellation freeing blocks, admission of a 300-request burst with n fan-out
counted, auth, TLS, health/reflection, draining, and engine death flipping health.

The real model's end-to-end checks are in tests/e2e/test_serving.py.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints.client import KilnClient
from kiln.proto import inference_pb2 as pb
from tests.entrypoints.serving import Servers, call, wait_idle
from tests.serving.engines import kill_engine, mock_async_engine, mock_llm_engine

PROMPTS = [f"Question {i}: name one thing that is {c}." for i, c in
           enumerate(["red", "blue", "green", "cold", "hot", "soft", "loud", "tiny"] * 4)]
MAX_TOKENS = 16
ENGINE = dict(max_num_seqs=32, num_blocks=1024)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pat = re.compile(rf"^{name}(\{{(.*)\}})? ([-+0-9.eEinf]+)$", re.M)
    for m in pat.finditer(text):
        got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    raise AssertionError(f"metric {name}{{{want}}} not found")


@pytest.fixture(scope="module")
def engine():
    eng = mock_llm_engine(**ENGINE)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    ids = [eng.add_request(p, sp) for p in PROMPTS]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o for o in eng.step() if o.finished})
    from kiln.engine.async_engine import AsyncEngine
    ae = AsyncEngine(eng)
    ae.references = [done[i].outputs[0] for i in ids]
    yield ae
    ae.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    s = Servers(engine, metrics_port=0, model_name="mock")
    yield s
    s.close()


def health_of(target: str) -> list[int]:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    return [stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10).status
            for svc in ("", "kiln.v1.Inference")]


def test_concurrent_streams_match_the_engine(server, engine):
    def run(i):
        with KilnClient(server.target) as c:
            text, toks, last = "", [], None
            for d in c.generate(PROMPTS[i], temperature=0.0, max_tokens=MAX_TOKENS, timeout=60):
                text += d.text
                toks += d.token_ids
                last = d
            return text, toks, last

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(run, range(32)))
    for i, ((text, toks, last), ref) in enumerate(zip(results, engine.references)):
        assert toks == ref.token_ids and text == ref.text
        assert last.finish_reason == ref.finish_reason
        assert last.HasField("usage") and last.usage.completion_tokens == len(ref.token_ids)
        assert last.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPTS[i]))
    wait_idle(engine)


def test_unary_tokenize_info_and_logprobs(server, engine):
    ref = engine.references[0]
    with KilnClient(server.target) as c:
        reply = c.generate_unary(PROMPTS[0], temperature=0.0, max_tokens=MAX_TOKENS, request_id="unary-1")
        assert reply.request_id == "unary-1"
        assert reply.completions[0].text == ref.text and list(reply.completions[0].token_ids) == ref.token_ids
        assert c.tokenize(PROMPTS[0]) == engine.tokenizer.encode(PROMPTS[0])
        chat = [{"role": "user", "content": "hi"}]
        assert c.tokenize(chat) == engine.tokenizer.apply_chat_template(chat)
        assert c.detokenize(ref.token_ids) == engine.tokenizer.decode(ref.token_ids)
        info = c.model_info()
        assert info.model == "mock" and info.max_model_len == 256 and info.max_num_seqs == 32
        assert info.vocab_size == engine.engine.spec.vocab_size and info.cache.blocks_total == 1023
        deltas = list(c.generate(PROMPTS[1], temperature=0.0, max_tokens=4, logprobs=2, n=2, seed=1))
        for idx in (0, 1):
            mine = [d for d in deltas if d.index == idx]
            lps = [lp for d in mine for lp in d.logprobs]
            assert len(lps) == sum(len(d.token_ids) for d in mine) == 4
            assert all(len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob for lp in lps)
            assert mine[-1].finish_reason == "length"
        assert deltas[-1].HasField("usage") and deltas[-1].usage.completion_tokens == 8
    wait_idle(engine)


def _bad_requests(vocab: int):
    sp = pb.SamplingParams
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi"),
                                     pb.ChatMessage(role="bogus", content="x")])
    return [
        (pb.GenerateRequest(text=""), "prompt"),
        (pb.GenerateRequest(), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 300)), "max_model_len"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, vocab + 5])), "vocabulary"),
        (pb.GenerateRequest(chat=chat), "messages[1].role"),
        (pb.GenerateRequest(chat=pb.ChatMessages()), "chat"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(max_tokens=0)), "max_tokens"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(temperature=-1)), "temperature"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(n=0)), "n must be"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(top_p=0)), "top_p"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(logprobs=50)), "logprobs"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(stop_token_ids=[vocab])), "stop_token_ids"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(stop=[""])), "stop"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(n=100)), "n is 100"),   # can never be admitted
    ]


def test_bad_input_is_invalid_argument_and_server_keeps_serving(server, engine):
    vocab = engine.engine.spec.vocab_size
    with KilnClient(server.target) as c:
        for req, word in _bad_requests(vocab):
            for call_ in (lambda r: list(c.stub.Generate(r, timeout=30)),
                          lambda r: c.stub.GenerateUnary(r, timeout=30)):
                with pytest.raises(grpc.RpcError) as e:
                    call_(req)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, e.value.details())
                assert word in e.value.details(), (word, e.value.details())
        with pytest.raises(grpc.RpcError) as e:
            c.tokenize([{"role": "bogus", "content": "x"}])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.detokenize([vocab + 1])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.value.details()
        # Invalid UTF-8 in a string field: field 1 (text), length 2, bytes ff fe.
        raw = c.channel.unary_stream("/kiln.v1.Inference/Generate", request_serializer=lambda b: b,
                                     response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            list(raw(b"\x0a\x02\xff\xfe", timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in e.value.details()
        out = c.generate_unary(PROMPTS[0], temperature=0.0, max_tokens=MAX_TOKENS)
        assert out.completions[0].text == engine.references[0].text
    wait_idle(engine)


def test_kiln_client_cli_streams_to_stdout(server, engine, capsys):
    from kiln.entrypoints.cli import main

    assert main(["client", "--target", server.target, "--max-tokens", str(MAX_TOKENS), PROMPTS[0]]) == 0
    assert capsys.readouterr().out == engine.references[0].text + "\n"


def test_deadline_and_abort_free_blocks(server, engine):
    engine.engine.runner.step_seconds = 0.02
    try:
        with KilnClient(server.target) as c:
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate(PROMPTS[2], temperature=0.0, max_tokens=200, ignore_eos=True, timeout=0.5))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_idle(engine)
            it = iter(c.generate(PROMPTS[3], temperature=0.0, max_tokens=200, ignore_eos=True, request_id="ab-1"))
            next(it)
            assert c.abort("ab-1") and not c.abort("no-such-request")
            assert [d.finish_reason for d in it][-1] == "abort"
    finally:
        engine.engine.runner.step_seconds = 0.0
    wait_idle(engine)


def test_burst_cancel_and_metrics(engine):
    """max_queued=0: a 33rd request is refused; 10 of 32 cancelled mid-stream free their blocks."""
    s = Servers(engine, metrics_port=0, max_queued=0)
    engine.engine.runner.step_seconds = 0.01
    try:
        started = threading.Barrier(33, timeout=60)
        cancel = threading.Event()

        def run(i):
            with KilnClient(s.target) as c:
                call_ = c.generate(PROMPTS[i], temperature=0.0, max_tokens=64, ignore_eos=True, timeout=60)
                it = iter(call_)
                toks = list(next(it).token_ids)
                started.wait()
                if i < 10:
                    cancel.wait(60)
                    call_.cancel()
                    return "cancelled", toks
                for d in it:
                    toks += d.token_ids
                return d.finish_reason, toks

        with ThreadPoolExecutor(32) as ex:
            futs = [ex.submit(run, i) for i in range(32)]
            started.wait()
            with KilnClient(s.target) as c:
                with pytest.raises(grpc.RpcError) as e:
                    list(c.generate("one too many", max_tokens=4, timeout=30))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max-queued" in e.value.details()
            cancel.set()
            results = [f.result(60) for f in futs]
        assert [r[0] for r in results] == ["cancelled"] * 10 + ["length"] * 22
        assert all(len(r[1]) == 64 for r in results[10:])
        st = wait_idle(engine)
        assert st["blocks_used"] == 0 and st["blocks_free"] == engine.engine.config.cache.num_blocks - 1
        deadline = time.monotonic() + 10
        while True:   # the cancelled handlers record their status as their tasks unwind
            text = s.scrape()
            if metric(text, "kiln_requests_total", method="Generate", status="CANCELLED") >= 10 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert metric(text, "kiln_requests_total", method="Generate", status="CANCELLED") == 10
        assert metric(text, "kiln_requests_total", method="Generate", status="OK") == 22
        assert metric(text, "kiln_requests_total", method="Generate", status="RESOURCE_EXHAUSTED") == 1
        assert metric(text, "kiln_kv_blocks_used") == 0 and metric(text, "kiln_queue_length") == 0
        assert metric(text, "kiln_generation_tokens_total") >= 22 * 64
        assert metric(text, "kiln_time_to_first_token_seconds_count") == 32
        assert metric(text, "kiln_pending_requests") == 0
    finally:
        engine.engine.runner.step_seconds = 0.0
        s.close()


def test_admission_burst_counts_n_fan_out():
    """300 concurrent requests of n=3 while the engine is held: max_num_seqs 8 + max_queued 16 = 24 slots, so
    exactly 8 requests get in and 292 get RESOURCE_EXHAUSTED at once; the 8 then finish normally."""
    gate = threading.Event()
    ae = mock_async_engine(max_num_seqs=8, num_blocks=512)
    s = Servers(ae, max_queued=16)
    ae.engine.runner.fault = lambda step: gate.wait(60)     # steps wait: nothing finishes during the burst
    try:
        with KilnClient(s.target) as c:
            req = pb.GenerateRequest(text="burst", sampling_params=pb.SamplingParams(n=3, max_tokens=4,
                                                                                     temperature=0.0))
            futs = [c.stub.GenerateUnary.future(req, timeout=60) for _ in range(300)]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in futs) < 292 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = [f for f in futs if f.done()]
            assert len(refused) == 292 and s.core.admission.used == 24
            assert all(f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in refused)
            gate.set()
            admitted = [f.result(60) for f in futs if f not in refused]
            assert len(admitted) == 8 and all(len(r.completions) == 3 for r in admitted)
            assert s.core.admission.used == 0
    finally:
        gate.set()
        s.close()
        ae.shutdown()


def test_one_admission_for_both_transports():
    """gRPC and HTTP share the core: slots taken over gRPC leave none for HTTP (429), and the reverse."""
    import openai
    gate = threading.Event()
    ae = mock_async_engine(max_num_seqs=2, num_blocks=256)
    s = Servers(ae, http=True, max_queued=1)
    ae.engine.runner.fault = lambda step: gate.wait(60)
    try:
        with KilnClient(s.target) as c:
            held = c.stub.GenerateUnary.future(pb.GenerateRequest(
                text="hold", sampling_params=pb.SamplingParams(n=3, max_tokens=2)), timeout=60)
            deadline = time.monotonic() + 10
            while s.core.admission.used < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s.core.admission.used == 3
            http = openai.OpenAI(base_url=f"{s.base}/v1", api_key="x", max_retries=0, timeout=30)
            with pytest.raises(openai.RateLimitError):
                http.completions.create(prompt="hi", model="mock", max_tokens=2)
            gate.set()
            assert len(held.result(30).completions) == 3
            assert http.completions.create(prompt="hi", max_tokens=2, model="mock").usage.completion_tokens == 2
    finally:
        gate.set()
        s.close()
        ae.shutdown()


def test_api_key(engine):
    s = Servers(engine, api_key="s3cret")
    try:
        for key in (None, "wrong"):
            with KilnClient(s.target, api_key=key) as c:
                with pytest.raises(grpc.RpcError) as e:
                    list(c.generate("hi", max_tokens=2))
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as e:
                    c.model_info()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in e.value.details()
        with KilnClient(s.target, api_key="s3cret") as c:
            assert c.generate_unary("hi", max_tokens=2).completions[0].token_ids
            assert health_of(s.target) == [SERVING, SERVING]      # open without a key
    finally:
        s.close()


def test_tls_with_a_key_file(engine, tmp_path):
    """--tls-cert/--tls-key serve TLS; --api-key-file is read by the CLI; a plaintext client gets nowhere."""
    from kiln.entrypoints.args import options_from_args
    from kiln.entrypoints.cli import build_parser
    cert, key, key_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "api-key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    key_file.write_text("from-a-file\n")
    opts = options_from_args(build_parser().parse_args(["serve", "--port", "0", "--tls-cert", str(cert),
                                                        "--tls-key", str(key), "--api-key-file", str(key_file)]))
    assert opts.api_key == "from-a-file" and opts.port == 0 and opts.http_port is None
    s = Servers(engine, api_key=opts.api_key, tls_cert=opts.tls_cert, tls_key=opts.tls_key)
    try:
        with KilnClient(s.target, api_key="from-a-file", tls_ca=str(cert)) as c:
            assert c.generate_unary("hi", max_tokens=2).completions[0].token_ids
        with KilnClient(s.target, api_key="from-a-file") as c:            # plaintext against a TLS port
            with pytest.raises(grpc.RpcError) as e:
                c.generate_unary("hi", max_tokens=2, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.close()
    key_file.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        options_from_args(build_parser().parse_args(["serve", "--api-key-file", str(key_file)]))


def test_health_reflection_and_drain(engine):
    s = Servers(None)
    try:
        assert health_of(s.target) == [NOT_SERVING, NOT_SERVING]
        with pytest.raises(grpc.RpcError) as e:
            KilnClient(s.target).model_info()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        s.attach(engine)
        assert health_of(s.target) == [SERVING, SERVING]
        db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(s.target))
        assert "kiln.v1.Inference" in db.get_services()
        assert db.FindFileContainingSymbol("kiln.v1.Inference").package == "kiln.v1"
        call(s.core.drain(0))
        time.sleep(0.1)
        assert health_of(s.target) == [NOT_SERVING, NOT_SERVING]
        with pytest.raises(grpc.RpcError) as e:
            list(KilnClient(s.target).generate("hi", max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
    finally:
        s.close()


def test_engine_death_flips_health():
    """A fault the engine cannot recover from: the in-flight call fails INTERNAL, Health/Check says NOT_SERVING
    for "" and kiln.v1.Inference, and new calls get UNAVAILABLE."""
    s = Servers(None, http=True)
    ae = mock_async_engine(on_death=s.core.engine_died)
    try:
        s.attach(ae)
        assert health_of(s.target) == [SERVING, SERVING] and s.get("/health")[0] == 200
        kill_engine(ae)
        with KilnClient(s.target) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.generate_unary("hi", max_tokens=4, timeout=30)
            assert e.value.code() == grpc.StatusCode.INTERNAL and "engine stopped" in e.value.details()
            deadline = time.monotonic() + 5
            while health_of(s.target) != [NOT_SERVING, NOT_SERVING] and time.monotonic() < deadline:
                time.sleep(0.02)
            assert health_of(s.target) == [NOT_SERVING, NOT_SERVING]
            assert s.get("/health") == (503, '{"status":"engine stopped"}')
            with pytest.raises(grpc.RpcError) as e:
                c.generate_unary("hi", max_tokens=4, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "engine stopped" in e.value.details()
    finally:
        s.close()
        ae.shutdown()
