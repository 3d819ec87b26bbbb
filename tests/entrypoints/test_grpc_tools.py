"""Tool calling over gRPC on the mock engine: `required` and a named choice always parse into arguments valid for
the tool's schema (`jsonschema`) and are the same calls the HTTP API returns for the same seed; streamed ToolCall
deltas reassemble to the unary reply's calls; `auto` parses a Hermes block; a tool round trip's messages reach
the chat template as the HTTP API hands them over; bad tool fields are INVALID_ARGUMENT."""
from __future__ import annotations

import json

import grpc
import jsonschema
import openai
import pytest

from kiln.entrypoints.client import KilnClient, generate_request
from kiln.proto import inference_pb2 as pb
from tests.entrypoints.serving import mock_servers, wait_idle
from tests.structured.test_tools import MSGS, SCHEMAS, TIME, TOOLS

MODEL = "mock-model"


@pytest.fixture(scope="module")
def servers():
    yield from mock_servers(grpc=True, http=True, model_name=MODEL, max_num_seqs=4, max_model_len=2048,
                            num_blocks=1024)   # byte-level prompts: the tool instructions are long


def request(tool_choice: str = "", parallel: bool | None = None, messages=MSGS, tools=TOOLS,
            **sampling) -> pb.GenerateRequest:
    return generate_request(messages, tools=tools or None, tool_choice=tool_choice, parallel_tool_calls=parallel,
                            **sampling)


def streamed(k: KilnClient, req) -> tuple[list[tuple[str, str, str]], str, str]:
    """The stream's calls [(id, name, arguments)] by index, its content text and the final finish_reason."""
    calls, text, finish = {}, "", ""
    for m in k.stub.Generate(req, timeout=60):
        text += m.text
        finish = m.finish_reason or finish
        for tc in m.tool_calls:
            entry = calls.setdefault(tc.index, ["", "", ""])
            entry[0] += tc.id
            entry[1] += tc.name
            entry[2] += tc.arguments
    return [tuple(v) for _, v in sorted(calls.items())], text, finish


def test_required_parses_streams_and_matches_http(servers):
    c = openai.OpenAI(base_url=f"{servers.base}/v1", api_key="none", max_retries=0, timeout=60)
    with KilnClient(servers.target) as k:
        for seed in range(4):
            req = request("required", parallel=False, temperature=1.0, seed=seed, max_tokens=200)
            (comp,) = k.stub.GenerateUnary(req, timeout=60).completions
            assert comp.finish_reason == "tool_calls" and comp.text == "" and len(comp.tool_calls) == 1
            tc = comp.tool_calls[0]
            jsonschema.validate(json.loads(tc.arguments), SCHEMAS[tc.name])
            assert tc.index == 0 and tc.id.startswith("chatcmpl-tool-")
            http = c.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=200)
            (htc,) = http.choices[0].message.tool_calls
            assert (tc.name, json.loads(tc.arguments)) == (htc.function.name, json.loads(htc.function.arguments))
            calls, text, finish = streamed(k, req)
            assert finish == "tool_calls" and text == ""
            assert [(n, json.loads(a)) for _, n, a in calls] == [(tc.name, json.loads(tc.arguments))]
            assert calls[0][0].startswith("chatcmpl-tool-")
    wait_idle(servers.engine_)


def test_named_choice_by_name_or_openai_object(servers):
    with KilnClient(servers.target) as k:
        for seed in range(3):
            for choice in ("get_time", json.dumps({"type": "function", "function": {"name": "get_time"}})):
                req = request(choice, temperature=1.0, seed=seed, max_tokens=100)
                (comp,) = k.stub.GenerateUnary(req, timeout=60).completions
                (tc,) = comp.tool_calls
                assert tc.name == "get_time" and comp.finish_reason == "tool_calls"
                jsonschema.validate(json.loads(tc.arguments), TIME)
                calls, _, _ = streamed(k, req)
                assert [(n, json.loads(a)) for _, n, a in calls] == [("get_time", json.loads(tc.arguments))]


def test_auto_parses_a_hermes_block_and_none_leaves_it_text(servers):
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}\n</tool_call>'
    with KilnClient(servers.target) as k:
        req = request("", max_tokens=120, temperature=0)          # tools without tool_choice: auto
        req.sampling_params.grammar = f"root ::= {json.dumps(block)}"   # stands in for a model that emits one
        (comp,) = k.stub.GenerateUnary(req, timeout=60).completions
        assert comp.finish_reason == "tool_calls" and comp.text == ""
        assert [(t.name, json.loads(t.arguments)) for t in comp.tool_calls] == \
            [("get_weather", {"city": "Rome", "unit": "C"})]
        calls, text, finish = streamed(k, req)
        assert finish == "tool_calls" and text == ""
        assert [(n, json.loads(a)) for _, n, a in calls] == [("get_weather", {"city": "Rome", "unit": "C"})]
        req.tool_choice = "none"
        (comp,) = k.stub.GenerateUnary(req, timeout=60).completions
        assert not comp.tool_calls and comp.text == block and comp.finish_reason == "stop"
        plain = request("", max_tokens=5, temperature=0)
        (comp,) = k.stub.GenerateUnary(plain, timeout=60).completions
        assert not comp.tool_calls and comp.finish_reason == "length" and comp.text


def test_a_tool_round_trip_reaches_the_template_as_over_http(servers, monkeypatch):
    conversation = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call-1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
        {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call-1"}]
    tok, seen = servers.engine_.tokenizer, []
    render = tok.apply_chat_template

    def spy(messages, **kw):
        seen.append(([dict(m) for m in messages], kw.get("tools")))
        return render(messages, **kw)
    monkeypatch.setattr(tok, "apply_chat_template", spy)
    req = request("", messages=conversation, max_tokens=2, temperature=0)   # the client takes OpenAI's dicts
    with KilnClient(servers.target) as k:
        k.stub.GenerateUnary(req, timeout=60)
    c = openai.OpenAI(base_url=f"{servers.base}/v1", api_key="none", max_retries=0, timeout=60)
    c.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, max_tokens=2, temperature=0)
    (grpc_msgs, grpc_tools), (http_msgs, http_tools) = seen
    assert grpc_msgs == http_msgs and grpc_tools == http_tools
    assert grpc_msgs[-3:] == conversation           # after the system message describing the tools
    assert grpc_msgs[0]["role"] == "system" and "get_weather" in grpc_msgs[0]["content"]


@pytest.mark.parametrize("change, needle", [
    (dict(tools="not json"), "tools must be the OpenAI tools list"),
    (dict(tool_choice="nope"), "tool_choice names 'nope'"),
    (dict(tool_choice="sometimes{"), "tool_choice names"),
    (dict(tool_choice="{bad"), "tool_choice is not valid JSON"),
    (dict(tools="", tool_choice="required"), "tool_choice needs tools"),
    (dict(text="a text prompt"), "tools need a chat prompt"),
])
def test_bad_tool_fields_are_invalid_argument(servers, change, needle):
    req = request("auto", max_tokens=4)
    for key, value in change.items():
        setattr(req, key, value)
    with KilnClient(servers.target) as k:
        with pytest.raises(grpc.RpcError) as e:
            k.stub.GenerateUnary(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
        assert k.generate_unary("still serving", max_tokens=2).completions[0].text
