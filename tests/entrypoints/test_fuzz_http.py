"""Property-based fuzzing of the OpenAI HTTP API: generated request bodies, valid and hostile, against a live
server on the mock engine.

Bodies are drawn over kiln's own request fields (completions and chat): each field gets a valid value, a
boundary value or junk (NaN, +-Infinity, 400-digit integers, wrong types, nested objects, huge strings), sent as
raw JSON (NaN and Infinity as Python's json writes them), plus truncated bodies and non-JSON. Pass: every answer
is 200 or a 4xx with an OpenAI error body, never a 5xx, no request hangs, the server keeps serving, and every
KV block is free afterwards. Examples per run: KILN_FUZZ_EXAMPLES (default 150; e.g. 5000 for a long run).
"""
from __future__ import annotations

import http.client
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.entrypoints.serving import Servers, wait_idle
from tests.serving.engines import mock_async_engine
from tests.tiny import VOCAB

MODEL = "mock-model"
EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "150"))

junk = st.one_of(
    st.none(), st.booleans(), st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")),
    st.just(10**400), st.just(-(10**20)), st.integers(-2**70, 2**70), st.floats(allow_nan=False, width=64),
    st.text(max_size=20), st.just("x" * 5000), st.lists(st.integers(), max_size=3), st.dictionaries(
        st.text(max_size=5), st.integers(), max_size=3))   # any value of any kind
unit = st.floats(0.01, 1.0)
token = st.integers(0, VOCAB - 1)
VALID = {   # in range: a body of these alone is served (200)
    "max_tokens": st.integers(1, 12), "temperature": st.floats(0, 2), "top_p": unit, "top_k": st.integers(-1, 300),
    "min_p": st.floats(0, 1), "n": st.integers(1, 3), "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=4)),
    "stop_token_ids": st.lists(token, max_size=4), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(token.map(str), st.floats(-100, 100), max_size=3),
    "ignore_eos": st.booleans(), "min_tokens": st.integers(0, 1), "stream": st.booleans(),
    "stream_options": st.just({"include_usage": True}), "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
}
EDGE = {    # just outside the range, or kinds of value the field does not take
    "max_tokens": st.integers(-2, 0), "temperature": st.floats(-3, 0, exclude_max=True), "top_p": st.floats(-1, 0),
    "top_k": st.integers(-10, -2), "n": st.integers(-1, 0) | st.integers(129, 10**6),
    "seed": st.integers(2**64, 2**70), "logprobs": st.integers(-2, 25), "top_logprobs": st.integers(-2, 25),
    "min_tokens": st.integers(13, 50), "echo": st.just(True), "best_of": st.integers(0, 5),
    "stop_token_ids": st.lists(st.integers(-5, VOCAB + 5), min_size=1, max_size=4),
    "logit_bias": st.dictionaries(st.one_of(st.integers(VOCAB, 10**30).map(str), st.text(max_size=4)),
                                  st.floats(-150, 150), min_size=1, max_size=3),
    "repetition_penalty": st.floats(-1, 0),
}
good_prompt = st.one_of(st.text(min_size=1, max_size=60), st.lists(token, min_size=1, max_size=40))
bad_prompt = st.one_of(st.just(""), st.just([]), st.lists(st.integers(-5, VOCAB + 5), max_size=40),
                       st.lists(st.text(max_size=10), max_size=3), st.lists(token, min_size=200, max_size=200), junk)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                 "content": st.text(max_size=40)})
bad_message = st.fixed_dictionaries({"role": st.sampled_from(["bogus", "", "USER"]) | junk,
                                     "content": st.text(max_size=40) | junk})


@st.composite
def bodies(draw) -> tuple[str, str]:
    """Half the bodies are valid; the rest carry one to three hostile fields (or a hostile prompt / model)."""
    chat = draw(st.booleans())
    body: dict = {"model": MODEL, "max_tokens": 8}
    body["messages" if chat else "prompt"] = draw(st.lists(message, min_size=1, max_size=3) if chat else good_prompt)
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=5, unique=True)):
        body[key] = draw(VALID[key])
    if draw(st.booleans()):                                                # make it hostile
        for _ in range(draw(st.integers(1, 3))):
            what = draw(st.sampled_from(["field", "field", "junk", "prompt", "model"]))
            if what == "prompt":
                body["messages" if chat else "prompt"] = draw(
                    st.lists(bad_message, min_size=1, max_size=3) | junk if chat else bad_prompt)
            elif what == "model":
                body["model"] = draw(st.sampled_from(["other-model", ""]) | junk)
            else:
                key = draw(st.sampled_from(sorted(EDGE) if what == "field" else sorted(VALID)))
                body[key] = draw(EDGE[key] if what == "field" else junk)
    raw = json.dumps(body)                        # NaN / Infinity written as JavaScript spells them
    if draw(st.integers(0, 19)) == 0:
        raw = raw[:draw(st.integers(0, len(raw)))]                        # a torn body
    return ("/v1/chat/completions" if chat else "/v1/completions"), raw


@pytest.fixture(scope="module")
def server():
    engine = mock_async_engine(max_num_seqs=8, num_blocks=256, max_model_len=128)
    s = Servers(engine, grpc=False, http=True, model_name=MODEL, max_queued=64)
    yield s, engine
    s.close()
    engine.shutdown()


def _post(port: int, path: str, raw: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", path, body=raw.encode("utf-8", "surrogatepass"),
                  headers={"content-type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
@given(case=bodies())
def test_generated_bodies_never_get_a_server_error(server, case):
    s, _ = server
    path, raw = case
    status, body = _post(s.http_port, path, raw)
    assert status < 500, (path, raw[:300], status, body[:300])
    if status != 200:
        err = json.loads(body)["error"]
        assert err["message"] and err["type"], body
    elif b'"stream": true' not in raw.encode() and b'"stream":true' not in raw.encode():
        assert json.loads(body)["choices"] is not None


def test_server_alive_and_blocks_free_after_the_fuzzing(server):
    s, engine = server
    status, body = _post(s.http_port, "/v1/completions", json.dumps({"model": MODEL, "prompt": "ok",
                                                                      "max_tokens": 3}))
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "length"
    wait_idle(engine)
    assert engine.stats()["blocks_used"] == 0
    assert s.get("/health")[0] == 200
