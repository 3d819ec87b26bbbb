"""Structured outputs on the default model (SmolLM2-135M-Instruct, float32, the default backend) through the
OpenAI HTTP API and gRPC: JSON Schema outputs (nested objects, arrays, enums, required fields, bounded numbers)
validate with `jsonschema`, greedy and sampled, streamed and not; regex and choice outputs match; an uncompilable
schema is a 400 and the server keeps serving. The mask itself is tested on the mock (tests/structured)."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from kiln.engine.async_engine import AsyncEngine
from kiln.entrypoints.client import KilnClient
from tests.entrypoints.serving import Servers, wait_idle

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
NAME = {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"}
SCHEMAS = [
    ("Describe a person as JSON.", {"type": "object", "properties": {"person": {
        "type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"]}}, "required": ["person"]}),
    ("List some colors as JSON.", {"type": "object", "properties": {"colors": {
        "type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 1,
        "maxItems": 3}}, "required": ["colors"]}),
    ("What is the weather like? Answer in JSON.", {"type": "object", "properties": {
        "temperature": {"type": "number", "minimum": -50, "maximum": 50}, "unit": {"enum": ["C", "F"]},
        "ok": {"type": "boolean"}}, "required": ["temperature", "unit", "ok"]}),
]


@pytest.fixture(scope="module")
def servers(default_gguf):
    from kiln.engine.llm import build_engine

    ae = AsyncEngine(build_engine(str(default_gguf), dtype="float32", max_model_len=512, max_num_seqs=8,
                                  warmup=False))
    s = Servers(ae, grpc=True, http=True, model_name=MODEL)
    s.engine_ = ae
    yield s
    s.close()
    ae.shutdown()


def chat(q):
    return [{"role": "user", "content": q}]


def test_json_schema_over_http_and_grpc_greedy_sampled_streamed(servers):
    c = openai.OpenAI(base_url=f"{servers.base}/v1", api_key="none", max_retries=0, timeout=600)

    def http(job):
        (q, schema), temperature, stream = job
        rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        kw = dict(model=MODEL, messages=chat(q), max_tokens=64, temperature=temperature, seed=5, response_format=rf)
        if not stream:
            r = c.chat.completions.create(**kw)
            return schema, r.choices[0].message.content, r.choices[0].finish_reason
        text, finish = "", None
        for chunk in c.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return schema, text, finish

    def grpc_(job):
        (q, schema), temperature = job
        with KilnClient(servers.target) as k:
            reply = k.generate_unary(chat(q), temperature=temperature, seed=9, max_tokens=64, json_schema=schema,
                                     timeout=600)
        return schema, reply.completions[0].text, reply.completions[0].finish_reason

    with ThreadPoolExecutor(8) as ex:            # one batch of 8: greedy bodies, sampled streams, both on gRPC
        futs = [ex.submit(http, (s, 0.0, False)) for s in SCHEMAS]
        futs += [ex.submit(http, (s, 0.8, True)) for s in SCHEMAS]
        futs += [ex.submit(grpc_, (SCHEMAS[0], 0.0)), ex.submit(grpc_, (SCHEMAS[2], 0.8))]
        results = [f.result() for f in futs]
    for schema, text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    wait_idle(servers.engine_)


def test_regex_choice_and_a_bad_schema(servers):
    c = openai.OpenAI(base_url=f"{servers.base}/v1", api_key="none", max_retries=0, timeout=600)
    date = r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"
    r = c.completions.create(model=MODEL, prompt="Today's date is", max_tokens=16, temperature=0,
                             extra_body={"guided_regex": date})
    assert re.fullmatch(date, r.choices[0].text), r.choices[0].text
    choices = ["Paris", "London", "Berlin"]
    r = c.chat.completions.create(model=MODEL, messages=chat("What is the capital of France?"), max_tokens=8,
                                  temperature=0.7, seed=1, extra_body={"guided_choice": choices})
    assert r.choices[0].message.content in choices
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=chat("x"), max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"$ref": "#/$defs/missing"}}}}})
    assert "missing" in e.value.body["message"]
    r = c.chat.completions.create(model=MODEL, messages=chat("What is the capital of France?"), max_tokens=8,
                                  temperature=0)
    assert r.choices[0].message.content
    wait_idle(servers.engine_)


def test_required_and_named_tool_choices_parse_on_the_model(servers):
    c = openai.OpenAI(base_url=f"{servers.base}/v1", api_key="none", max_retries=0, timeout=600)
    weather = {"type": "object", "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                               "parameters": weather}}]
    msgs = chat("What is the weather in Paris?")
    named = {"type": "function", "function": {"name": "get_weather"}}

    def one(choice):
        return c.chat.completions.create(model=MODEL, messages=msgs, tools=tools, tool_choice=choice,
                                         parallel_tool_calls=False, max_tokens=48, temperature=0)
    with ThreadPoolExecutor(2) as ex:
        replies = list(ex.map(one, ["required", named]))
    for r in replies:
        (tc,) = r.choices[0].message.tool_calls
        assert tc.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(tc.function.arguments), weather)
    wait_idle(servers.engine_)
