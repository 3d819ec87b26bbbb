"""/v1/embeddings and the gRPC Embed RPC on the mock engine, against hand-computed pools of the mock's hidden
states (`[(token + d) % 5 - 2]` per position): every `input` form, float and base64 (decoded as the OpenAI
client does), last and mean pooling, usage, `dimensions` other than the hidden size -> 400, bad input -> 400 /
INVALID_ARGUMENT naming the field, another model -> 404; the official openai client; the engine idle after."""
from __future__ import annotations

import base64

import grpc
import numpy as np
import openai
import pytest

from kiln.proto import inference_pb2 as pb
from kiln.proto import inference_pb2_grpc as pbg
from tests.entrypoints.serving import mock_servers, post_json, wait_idle

MODEL = "mock-model"
D = 64        # the mock spec's hidden size (tests/mock_engine.TINY_CONFIG)


@pytest.fixture(scope="module")
def server():
    yield from mock_servers(grpc=True, http=True, model_name=MODEL)


def expected(ids, pooling="last", normalize=True):
    hs = np.stack([((t + np.arange(D)) % 5 - 2).astype(np.float64) for t in ids])
    v = hs[-1] if pooling == "last" else hs.mean(0)
    return v / np.linalg.norm(v) if normalize else v


def post(s, body) -> tuple[int, dict]:
    return post_json(s.base + "/v1/embeddings", body)


def test_every_input_form(server):
    tok = server.engine_.tokenizer
    a, b = tok.encode("hello world"), tok.encode("an embedding of a longer sentence")
    for inp, ids in (("hello world", [a]), (["hello world", "an embedding of a longer sentence"], [a, b]),
                     ([5, 6, 7], [[5, 6, 7]]), ([[5, 6, 7], [9, 10]], [[5, 6, 7], [9, 10]])):
        for pooling in ("last", "mean"):
            st, r = post(server, {"model": MODEL, "input": inp, "pooling": pooling})
            assert st == 200, r
            assert r["object"] == "list" and r["model"] == MODEL and len(r["data"]) == len(ids)
            for i, (d, want) in enumerate(zip(r["data"], ids)):
                assert d["object"] == "embedding" and d["index"] == i
                np.testing.assert_allclose(d["embedding"], expected(want, pooling), atol=1e-6)
            assert r["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
    st, r = post(server, {"input": [5, 6, 7], "encoding_format": "base64", "dimensions": D, "normalize": False})
    assert st == 200
    vec = np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vec, expected([5, 6, 7], normalize=False), atol=1e-6)
    wait_idle(server.engine_)


def test_openai_client(server):
    c = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0)
    r = c.embeddings.create(model=MODEL, input=["hello world", "bye"])     # the client asks for base64
    ids = [server.engine_.tokenizer.encode(t) for t in ("hello world", "bye")]
    for d, want in zip(r.data, ids):
        np.testing.assert_allclose(d.embedding, expected(want), atol=1e-6)
    assert r.usage.prompt_tokens == sum(map(len, ids))


@pytest.mark.parametrize("body, field", [
    ({"input": "x", "dimensions": 16}, "dimensions"), ({"input": "x", "dimensions": True}, "dimensions"),
    ({"input": []}, "input"), ({"input": [1, "a"]}, "input"), ({"input": 3}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"), ({"input": "x", "pooling": "cls"}, "pooling"),
    ({"input": "x", "normalize": "yes"}, "normalize"), ({"input": "x", "temperature": 1}, "temperature"),
    ({"input": [[1, 2], [999999]]}, None)])
def test_bad_bodies_are_400(server, body, field):
    st, r = post(server, body)
    assert st == 400 and r["error"]["type"] == "invalid_request_error", r
    if field:
        assert r["error"]["param"] == field
    wait_idle(server.engine_)


def test_another_model_is_404(server):
    st, r = post(server, {"model": "other", "input": "x"})
    assert st == 404 and r["error"]["code"] == "model_not_found"


def test_grpc_embed(server):
    stub = pbg.InferenceStub(grpc.insecure_channel(server.target))
    r = stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="hello world"),
                                           pb.EmbedInput(token_ids=pb.TokenIds(ids=[5, 6, 7]))], pooling="mean"))
    ids = [server.engine_.tokenizer.encode("hello world"), [5, 6, 7]]
    for e, want in zip(r.embeddings, ids):
        np.testing.assert_allclose(e.values, expected(want, "mean"), atol=1e-6)
        assert e.prompt_tokens == len(want)
    assert r.usage.prompt_tokens == sum(map(len, ids))
    r = stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="x")], normalize=False))
    np.testing.assert_allclose(r.embeddings[0].values, expected(server.engine_.tokenizer.encode("x"),
                                                                 normalize=False), atol=1e-6)
    for req, what in ((pb.EmbedRequest(), "inputs"), (pb.EmbedRequest(inputs=[pb.EmbedInput()]), "inputs\\[0\\]"),
                      (pb.EmbedRequest(inputs=[pb.EmbedInput(text="x")], pooling="cls"), "pooling")):
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert what.replace("\\", "") in e.value.details() or "pooling must be" in e.value.details()
    wait_idle(server.engine_)
