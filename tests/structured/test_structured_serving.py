"""Structured outputs through the engine and every transport, on the mock engine: the mask constrains even the
mock's hand-computable tokens (its natural token is skipped until an allowed one), outputs match the regex, the
choice list and the JSON Schema (checked with `jsonschema`), greedy and sampled, streamed and not; an
uncompilable schema is a 400 / INVALID_ARGUMENT naming the problem and the server keeps serving."""
from __future__ import annotations

import json
import re

import grpc
import jsonschema
import openai
import pytest

from kiln.backends.mock import next_token
from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints import batch as B
from kiln.entrypoints.client import KilnClient
from kiln.structured.params import StructuredOutputsParams as S
from tests.entrypoints.serving import mock_servers, wait_idle
from tests.mock_engine import mock_engine

MODEL = "mock-model"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
    "n": {"type": "integer", "minimum": -5, "maximum": 30},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}},
    "required": ["name", "n", "tags", "inner"], "additionalProperties": False}
REGEX = r"[a-c]{2}-[0-9]{3}"
CHOICES = ["alpha", "beta", "gamma"]


def run(eng, prompt, sp):
    rid = eng.add_request(prompt, sp)
    while True:
        for o in eng.step():
            if o.request_id == rid and o.finished:
                return o


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_outputs_match_every_kind_of_constraint(temperature):
    eng = mock_engine()
    kw = dict(temperature=temperature, max_tokens=120, seed=7)
    for prompt in ["hello", "a longer prompt", "xyz"]:
        o = run(eng, prompt, SamplingParams(structured_outputs=S(regex=REGEX), **kw)).outputs[0]
        assert re.fullmatch(REGEX, o.text) and o.finish_reason == "stop", o.text
        o = run(eng, prompt, SamplingParams(structured_outputs=S(choice=CHOICES), **kw)).outputs[0]
        assert o.text in CHOICES and o.finish_reason == "stop"
        o = run(eng, prompt, SamplingParams(structured_outputs=S(json=SCHEMA), n=2, **kw))
        for c in o.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
        o = run(eng, prompt, SamplingParams(structured_outputs=S(grammar='root ::= "<" [0-9] [0-9]? ">"'), **kw))
        assert re.fullmatch(r"<[0-9]{1,2}>", o.outputs[0].text), o.outputs[0].text
    assert len(eng.structured) == 0            # every matcher was dropped with its sample


def test_the_mask_changes_the_mocks_token():
    """Without a mask the mock emits next_token(...); a choice whose first letters exclude it forces others."""
    eng = mock_engine()
    ids = eng.tokenizer.encode("q")
    natural = next_token(ids[-1], len(ids) - 1, eng.spec.vocab_size)
    first = eng.tokenizer.decode([natural])
    choices = [c for c in ("zz", "yy", "ww") if not c.startswith(first)][:2]
    o = run(eng, ids, SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=S(choice=choices)))
    assert o.outputs[0].token_ids[0] != natural and o.outputs[0].text in choices


def test_the_request_ends_when_the_grammar_terminates_even_with_ignore_eos():
    eng = mock_engine()
    o = run(eng, "hi", SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True,
                                      structured_outputs=S(choice=["done"]))).outputs[0]
    assert o.finish_reason == "stop" and o.text.startswith("done") and len(o.token_ids) == 5   # + the EOS


@pytest.fixture(scope="module")
def servers():
    yield from mock_servers(grpc=True, http=True, model_name=MODEL, max_num_seqs=4)


def client(s):
    return openai.OpenAI(base_url=f"{s.base}/v1", api_key="none", max_retries=0, timeout=60)


def test_http_response_format_and_guided_fields(servers):
    c = client(servers)
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    for temperature in (0.0, 1.0):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=150,
                                      temperature=temperature, seed=1, response_format=rf)
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        text = ""
        for chunk in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                               max_tokens=150, temperature=temperature, seed=2, stream=True,
                                               response_format=rf):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        jsonschema.validate(json.loads(text), SCHEMA)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=100,
                                  temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = c.completions.create(model=MODEL, prompt="p", max_tokens=20, temperature=0,
                             extra_body={"guided_regex": REGEX})
    assert re.fullmatch(REGEX, r.choices[0].text)
    r = c.completions.create(model=MODEL, prompt="p", max_tokens=20, temperature=0.5,
                             extra_body={"structured_outputs": {"choice": CHOICES}})
    assert r.choices[0].text in CHOICES
    r = c.completions.create(model=MODEL, prompt="p", max_tokens=20, temperature=0,
                             extra_body={"guided_choice": CHOICES})
    assert r.choices[0].text in CHOICES
    wait_idle(servers.engine_)


@pytest.mark.parametrize("extra, words", [
    ({"guided_json": {"type": "frobnicate"}}, ["frobnicate"]),
    ({"guided_regex": "(unclosed"}, ["parenthesis"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
     ["nope"]),
    ({"guided_regex": "a", "guided_choice": ["a"]}, ["cannot be combined"]),
])
def test_bad_constraints_are_400_and_the_server_keeps_serving(servers, extra, words):
    c = client(servers)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="p", max_tokens=5, extra_body=extra)
    msg = e.value.body["message"]
    assert all(w in msg for w in words), msg
    r = c.completions.create(model=MODEL, prompt="p", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_grpc_structured_fields(servers):
    with KilnClient(servers.target) as k:
        reply = k.generate_unary("p", temperature=0.0, max_tokens=150, json_schema=SCHEMA)
        jsonschema.validate(json.loads(reply.completions[0].text), SCHEMA)
        text = "".join(d.text for d in k.generate("p", temperature=1.0, seed=3, max_tokens=30, regex=REGEX))
        assert re.fullmatch(REGEX, text)
        reply = k.generate_unary("p", temperature=0.0, max_tokens=30, choice=CHOICES)
        assert reply.completions[0].text in CHOICES
        with pytest.raises(grpc.RpcError) as e:
            k.generate_unary("p", max_tokens=5, grammar="root ::= (")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grammar" in e.value.details()
        assert k.generate_unary("p", max_tokens=2).completions[0].finish_reason == "length"


def test_batch_lines(tmp_path):
    eng = mock_engine()
    inp = tmp_path / "in.jsonl"
    lines = [{"custom_id": "a", "url": "/v1/chat/completions", "body": {
                 "messages": [{"role": "user", "content": "x"}], "max_tokens": 150, "temperature": 0,
                 "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}}},
             {"custom_id": "b", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 20,
                                                                  "guided_choice": CHOICES}},
             {"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 5,
                                                                  "guided_json": {"type": "nonsense"}}}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    B.run_batch(eng, str(inp), tmp_path / "out.jsonl", progress=False)
    recs = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    jsonschema.validate(json.loads(recs["a"]["response"]["body"]["choices"][0]["message"]["content"]), SCHEMA)
    assert recs["b"]["response"]["body"]["choices"][0]["text"] in CHOICES
    assert recs["c"]["response"]["status_code"] == 400 and "nonsense" in recs["c"]["error"]["message"]
