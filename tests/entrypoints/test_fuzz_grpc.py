"""Property-based fuzzing of the gRPC API: generated kiln.v1 requests, valid and hostile, against a live server on
the mock engine.

GenerateRequests are drawn field by field over the proto (every SamplingParams field set or unset, floats
including NaN, +-Infinity and float32 extremes, integers over each field's whole wire range, every prompt kind
with in- and out-of-vocabulary ids and unknown chat roles, logit_bias maps, request ids), plus raw bytes that are
not a valid message, sent to Generate and GenerateUnary. Tokenize and Detokenize get the same treatment. Pass:
every call ends OK or with a client-error status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ALREADY_EXISTS), never
INTERNAL / UNKNOWN, within its deadline; the server keeps serving and every KV block is free afterwards.
Examples per run: KILN_FUZZ_EXAMPLES (default 150).
"""
from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.proto import inference_pb2 as pb
from tests.entrypoints.serving import Servers, wait_idle
from tests.serving.engines import mock_async_engine
from tests.tiny import VOCAB

EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "150"))
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.ALREADY_EXISTS}
I32 = st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-3, 40))
F32 = st.one_of(st.floats(width=32), st.floats(-3, 3, width=32), st.sampled_from([0.0, 1.0, 0.5]))
TOKEN = st.one_of(st.integers(0, VOCAB - 1), I32)
FLOATS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")
INTS = ("n", "top_k", "logprobs", "min_tokens")


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    m = pb.SamplingParams(max_tokens=draw(st.integers(1, 10) | I32) if draw(st.booleans()) else 6)
    for f in draw(st.lists(st.sampled_from(FLOATS + INTS + ("seed", "ignore_eos", "skip_special_tokens")),
                           max_size=6, unique=True)):
        if f in FLOATS:
            setattr(m, f, draw(F32))
        elif f in INTS:
            setattr(m, f, draw(I32))
        elif f == "seed":
            m.seed = draw(st.integers(-2**63, 2**63 - 1))
        else:
            setattr(m, f, draw(st.booleans()))
    m.stop.extend(draw(st.lists(st.text(max_size=6), max_size=5)))
    m.stop_token_ids.extend(draw(st.lists(TOKEN, max_size=3)))
    for k, v in draw(st.dictionaries(TOKEN, F32, max_size=3)).items():
        m.logit_bias[k] = v
    return m


@st.composite
def requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=draw(st.sampled_from(["", "", "fixed-id"]) | st.text(max_size=8)))
    kind = draw(st.sampled_from(["text", "token_ids", "chat", "none"]))
    if kind == "text":
        req.text = draw(st.text(max_size=80))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(TOKEN, max_size=60)))
    elif kind == "chat":
        for _ in range(draw(st.integers(0, 3))):
            req.chat.messages.add(role=draw(st.sampled_from(["user", "system", "assistant", "bogus", ""])),
                                  content=draw(st.text(max_size=40)))
    if draw(st.booleans()):
        req.sampling_params.CopyFrom(draw(sampling_params()))
    return req


@pytest.fixture(scope="module")
def server():
    engine = mock_async_engine(max_num_seqs=8, num_blocks=256, max_model_len=128)
    s = Servers(engine, grpc=True, max_queued=64)
    channel = grpc.insecure_channel(s.target)
    yield s, engine, channel
    channel.close()
    s.close()
    engine.shutdown()


def _ok(call) -> None:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS, (e.code(), e.details())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
@given(req=requests(), unary=st.booleans())
def test_generated_requests_never_get_a_server_error(server, req, unary):
    _, _, channel = server
    path = "/kiln.v1.Inference/" + ("GenerateUnary" if unary else "Generate")
    raw = req.SerializeToString()
    if unary:
        rpc = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        _ok(lambda: rpc(raw, timeout=30))
    else:
        rpc = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        _ok(lambda: list(rpc(raw, timeout=30)))


@settings(max_examples=EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=64), text=st.text(max_size=40), ids=st.lists(TOKEN, max_size=10))
def test_junk_bytes_and_tokenizer_calls(server, blob, text, ids):
    _, _, channel = server
    for method in ("Generate", "GenerateUnary", "Tokenize", "Detokenize"):
        rpc = channel.unary_stream if method == "Generate" else channel.unary_unary
        call = rpc(f"/kiln.v1.Inference/{method}", request_serializer=None, response_deserializer=None)
        _ok(lambda: list(call(blob, timeout=30)) if method == "Generate" else call(blob, timeout=30))
    tok = channel.unary_unary("/kiln.v1.Inference/Tokenize", request_serializer=pb.TokenizeRequest.SerializeToString,
                              response_deserializer=pb.TokenizeResponse.FromString)
    _ok(lambda: tok(pb.TokenizeRequest(text=text), timeout=30))
    detok = channel.unary_unary("/kiln.v1.Inference/Detokenize",
                                request_serializer=pb.DetokenizeRequest.SerializeToString,
                                response_deserializer=pb.DetokenizeResponse.FromString)
    _ok(lambda: detok(pb.DetokenizeRequest(token_ids=ids), timeout=30))


def test_server_alive_and_blocks_free_after_the_fuzzing(server):
    s, engine, channel = server
    rpc = channel.unary_unary("/kiln.v1.Inference/GenerateUnary",
                              request_serializer=pb.GenerateRequest.SerializeToString,
                              response_deserializer=pb.GenerateReply.FromString)
    reply = rpc(pb.GenerateRequest(text="ok", sampling_params=pb.SamplingParams(max_tokens=3)), timeout=30)
    assert reply.completions[0].finish_reason == "length" and len(reply.completions[0].token_ids) == 3
    wait_idle(engine)
    assert engine.stats()["blocks_used"] == 0
