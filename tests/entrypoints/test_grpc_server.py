"""`kiln serve` over real loopback sockets: streaming parity with LLM.generate, cancellation, bad input,
admission control, auth, health/reflection, metrics, and SIGTERM draining (in a subprocess).

One engine (the default model, float32, max_model_len 512) is built once for the module and shared by the
in-process servers; each server runs in its own asyncio loop on a background thread.
"""
from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.sampling_params import SamplingParams
from tests.entrypoints.serving import serve_process, server_loop, wait_idle
from kiln.entrypoints.client import KilnClient
from kiln.entrypoints.grpc_server import KilnServer, ServeOptions
from kiln.proto import inference_pb2 as pb

pytestmark = pytest.mark.slow

PROMPTS = [f"Question {i}: name one thing that is {c}." for i, c in
           enumerate(["red", "blue", "green", "cold", "hot", "soft", "loud", "tiny"] * 4)]
MAX_TOKENS = 16


class ServerThread:
    """A KilnServer on the shared test event loop."""

    def __init__(self, opts: ServeOptions, engine: AsyncEngine | None, warm: bool = True):
        self.loop = server_loop()
        self.server = KilnServer(opts)
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"
        if engine is not None:
            self.attach(engine, warm)

    def attach(self, engine: AsyncEngine, warm: bool = True) -> None:
        self.server.attach(engine, "smollm2-135m-instruct")
        if warm:
            self.call(self.server.warmup())

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def close(self) -> None:
        self.call(self.server.stop(0.5))


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pat = re.compile(rf"^{name}(\{{(.*)\}})? ([-+0-9.eEinf]+)$", re.M)
    for m in pat.finditer(text):
        got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    raise AssertionError(f"metric {name}{{{want}}} not found")


@pytest.fixture(scope="module")
def engine(default_gguf):
    from kiln.engine.llm import build_engine

    eng = build_engine(str(default_gguf), dtype="float32", max_model_len=512, max_num_seqs=32, warmup=False)
    # References from the synchronous engine, as LLM.generate runs it, before the async thread owns it.
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    ids = [eng.add_request(p, sp) for p in PROMPTS]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o for o in eng.step() if o.finished})
    refs = [done[i].outputs[0] for i in ids]
    ae = AsyncEngine(eng)
    ae.references = refs
    yield ae
    ae.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    s = ServerThread(ServeOptions(port=0, metrics_port=0), engine)
    yield s
    s.close()


def test_concurrent_streams_match_llm_generate(server, engine):
    def run(i):
        with KilnClient(server.target) as c:
            text, toks, last = "", [], None
            for d in c.generate(PROMPTS[i], temperature=0.0, max_tokens=MAX_TOKENS, timeout=120):
                text += d.text
                toks += d.token_ids
                last = d
            return text, toks, last

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(run, range(32)))
    for (text, toks, last), ref in zip(results, engine.references):
        assert toks == ref.token_ids
        assert text == ref.text
        assert last.finish_reason == ref.finish_reason
        assert last.HasField("usage") and last.usage.completion_tokens == len(ref.token_ids)
        assert last.usage.prompt_tokens > 0
    wait_idle(engine)


def test_unary_tokenize_info_and_logprobs(server, engine):
    ref = engine.references[0]
    with KilnClient(server.target) as c:
        reply = c.generate_unary(PROMPTS[0], temperature=0.0, max_tokens=MAX_TOKENS, request_id="unary-1")
        assert reply.request_id == "unary-1"
        assert reply.completions[0].text == ref.text and list(reply.completions[0].token_ids) == ref.token_ids
        ids = c.tokenize(PROMPTS[0])
        assert ids == engine.tokenizer.encode(PROMPTS[0])
        assert c.detokenize(ref.token_ids) == engine.tokenizer.decode(ref.token_ids)
        info = c.model_info()
        assert info.max_model_len == 512 and info.dtype == "float32"
        assert info.backend == engine.engine.config.backend and info.backend in ("jax", "torch")
        assert info.vocab_size == engine.engine.spec.vocab_size and list(info.decode_batch_buckets)
        assert info.cache.blocks_total > 0
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
    return [
        (pb.GenerateRequest(text=""), "prompt"),
        (pb.GenerateRequest(), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 600)), "max_model_len"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, vocab + 5])), "vocabulary"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(max_tokens=0)), "max_tokens"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(temperature=-1)), "temperature"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(n=0)), "n must be"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(top_p=0)), "top_p"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(logprobs=50)), "logprobs"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(stop_token_ids=[vocab])), "stop_token_ids"),
        (pb.GenerateRequest(text="hi", sampling_params=sp(stop=[""])), "stop"),
    ]


def test_bad_input_is_invalid_argument_and_server_keeps_serving(server, engine):
    vocab = engine.engine.spec.vocab_size
    with KilnClient(server.target) as c:
        for req, word in _bad_requests(vocab):
            for call in (lambda r: list(c.stub.Generate(r, timeout=30)), lambda r: c.stub.GenerateUnary(r, timeout=30)):
                with pytest.raises(grpc.RpcError) as e:
                    call(req)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, e.value.details())
                assert word in e.value.details(), (word, e.value.details())
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


def test_deadline_aborts_and_frees_blocks(server, engine):
    with KilnClient(server.target) as c:
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate(PROMPTS[2], temperature=0.0, max_tokens=400, ignore_eos=True, timeout=1.0))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(engine)


def test_burst_cancel_and_metrics(engine):
    """max_queued=0: a 33rd request is refused; 10 of 32 cancelled mid-stream free their blocks."""
    s = ServerThread(ServeOptions(port=0, metrics_port=0, max_queued=0), engine)
    try:
        started = threading.Barrier(33, timeout=120)
        cancel = threading.Event()

        def run(i):
            with KilnClient(s.target) as c:
                call = c.generate(PROMPTS[i], temperature=0.0, max_tokens=64, ignore_eos=True, timeout=120)
                it = iter(call)
                toks = list(next(it).token_ids)
                started.wait()
                if i < 10:
                    cancel.wait(60)
                    call.cancel()
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
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max-queued" in e.value.details()
            cancel.set()
            results = [f.result(120) for f in futs]
        assert [r[0] for r in results] == ["cancelled"] * 10 + ["length"] * 22
        assert all(len(r[1]) == 64 for r in results[10:])
        st = wait_idle(engine)
        assert st["blocks_used"] == 0 and st["blocks_free"] == engine.engine.config.cache.num_blocks - 1
        deadline = time.monotonic() + 10
        while True:   # the cancelled handlers record their status as their tasks unwind
            text = s.scrape()
            if _metric(text, "kiln_requests_total", method="Generate", status="CANCELLED") >= 10 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert _metric(text, "kiln_requests_total", method="Generate", status="CANCELLED") == 10
        assert _metric(text, "kiln_requests_total", method="Generate", status="OK") == 22
        assert _metric(text, "kiln_requests_total", method="Generate", status="RESOURCE_EXHAUSTED") == 1
        assert _metric(text, "kiln_kv_blocks_used") == 0
        assert _metric(text, "kiln_kv_blocks_free") == st["blocks_free"]
        assert _metric(text, "kiln_queue_length") == 0
        assert _metric(text, "kiln_generation_tokens_total") >= 22 * 64
        assert _metric(text, "kiln_time_to_first_token_seconds_count") == 32
        assert _metric(text, "kiln_compiles") >= 1
        assert 0 <= _metric(text, "kiln_bucket_padding_ratio") < 1
        # still serving
        with KilnClient(s.target) as c:
            assert c.generate_unary(PROMPTS[0], temperature=0.0, max_tokens=MAX_TOKENS).completions[0].text \
                == engine.references[0].text
    finally:
        s.close()


def test_api_key(engine):
    s = ServerThread(ServeOptions(port=0, api_key="s3cret"), engine)
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
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(s.target))   # open without a key
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        s.close()


def test_tls_with_a_key_file(engine, tmp_path):
    """--tls-cert/--tls-key serve TLS; --api-key-file is read by the CLI; a plaintext client gets nowhere."""
    import subprocess
    from kiln.entrypoints.cli import build_parser
    from kiln.entrypoints.serve import options_from_args
    cert, key, key_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "api-key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    key_file.write_text("from-a-file\n")
    args = build_parser().parse_args(["serve", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key),
                                      "--api-key-file", str(key_file)])
    opts = options_from_args(args)
    assert opts.api_key == "from-a-file"
    s = ServerThread(opts, engine)
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


def test_health_and_reflection(engine):
    s = ServerThread(ServeOptions(port=0), None)
    try:
        ch = grpc.insecure_channel(s.target)
        health = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "kiln.v1.Inference"):
            assert health.Check(health_pb2.HealthCheckRequest(service=svc)).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            KilnClient(s.target).model_info()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        s.attach(engine)
        for svc in ("", "kiln.v1.Inference"):
            assert health.Check(health_pb2.HealthCheckRequest(service=svc)).status == \
                health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "kiln.v1.Inference" in db.get_services()
        svc = db.FindFileContainingSymbol("kiln.v1.Inference")
        assert svc.package == "kiln.v1"
        s.call(s.server.drain(0))
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            list(KilnClient(s.target).generate("hi", max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
    finally:
        s.close()


def test_sigterm_drains_in_flight_and_exits_zero(default_gguf, tmp_path):
    args = ["--model", str(default_gguf), "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "2",
            "--port", "0", "--drain-seconds", "60"]
    with serve_process(args, r"listening on 127\.0\.0\.1:(\d+)") as (proc, port, lines):
        target = f"127.0.0.1:{port}"
        first = threading.Barrier(3, timeout=60)

        def run(prompt):
            with KilnClient(target) as c:
                toks, last = [], None
                for d in c.generate(prompt, temperature=0.0, max_tokens=40, ignore_eos=True, timeout=120):
                    if not toks:
                        first.wait()
                    toks += d.token_ids
                    last = d
                return last.finish_reason, len(toks)

        with ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(run, p) for p in ("Hello there", "Once upon a time")]
            first.wait()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with KilnClient(target) as c:
                with pytest.raises(grpc.RpcError) as e:
                    list(c.generate("too late", max_tokens=2, timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert [f.result(120) for f in futs] == [("length", 40)] * 2
        assert proc.wait(60) == 0, "".join(lines)
        assert any("draining" in line for line in lines)
