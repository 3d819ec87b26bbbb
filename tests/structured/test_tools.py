"""Tool calling on the mock engine through the OpenAI HTTP API: `required` and a named choice always parse into
arguments valid for the tool's schema (`jsonschema`), streamed deltas reassemble to the same calls, `auto`
returns tool_calls when the output holds a Hermes `<tool_call>` block (parsers tested on hand-written text),
bad tool fields are 400s."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from kiln.tools import parsers
from kiln.tools.output import ToolStream, ToolUse
from kiln.tools.spec import from_body
from tests.entrypoints.serving import mock_servers, wait_idle
from tests.mock_engine import mock_engine

MODEL = "mock-model"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
                                            "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
        "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_parsers_on_hand_written_text():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>'
    assert parsers.parse_hermes(text) == ("Let me look.", [("get_weather", '{"city": "Paris"}'),
                                                           ("get_time", '{"zone": 1}')])
    assert parsers.parse_hermes("no calls here") == ("no calls here", [])
    bad = "<tool_call>{not json</tool_call>"
    assert parsers.parse_hermes(bad) == (bad, [])
    assert parsers.parse_llama3_json('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", '
                                     '"parameters": {}}') == (None, [("f", '{"a": 1}'), ("g", "{}")])
    assert parsers.select("... <tool_call> ...") == "hermes"
    assert parsers.select("{{ '<|python_tag|>' }}") == "llama3_json"
    assert parsers.select(None, "llama3_json") == "llama3_json"


def test_hermes_stream_reassembles_the_calls_whatever_the_split():
    text = 'Sure <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call>'
    for step in (1, 3, 7, len(text)):
        ts = ToolStream(ToolUse(from_body({"tools": TOOLS}), "hermes"))
        deltas = [d for i in range(0, len(text), step) for d in ts.feed(text[i:i + step])]
        rest, made = ts.finish()
        deltas += rest
        content = "".join(d.get("content", "") for d in deltas)
        args = "".join(tc["function"].get("arguments", "") for d in deltas for tc in d.get("tool_calls", []))
        names = [tc["function"]["name"] for d in deltas for tc in d.get("tool_calls", []) if "name" in tc["function"]]
        assert made and content == "Sure " and names == ["get_weather"]
        assert json.loads(args) == {"city": "Oslo", "unit": "C"}


@pytest.mark.parametrize("body, field", [
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice names"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
])
def test_bad_tool_fields(body, field):
    with pytest.raises(ValueError, match="^" + field.replace("[", r"\[").replace("]", r"\]")):
        from_body(body)


@pytest.fixture(scope="module")
def server():
    yield from mock_servers(grpc=False, http=True, model_name=MODEL, max_num_seqs=4, max_model_len=2048, num_blocks=1024)   # byte-level prompts


def client(s):
    return openai.OpenAI(base_url=f"{s.base}/v1", api_key="none", max_retries=0, timeout=60)


def stream_calls(c, **kw) -> tuple[dict[int, dict], str]:
    calls, finish = {}, None
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
    return calls, finish


def test_required_schema_allows_several_calls_only_when_parallel():
    assert "maxItems" not in from_body({"tools": TOOLS, "tool_choice": "required"}).constraint().json
    spec = from_body({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    assert spec.constraint().json["maxItems"] == 1


def test_required_always_parses_into_valid_arguments(server):
    # one call (parallel_tool_calls false): the mock would go on adding parallel calls until max_tokens
    c, parallel = client(server), False
    for seed in range(6):
        r = c.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required",
                                      parallel_tool_calls=parallel, temperature=1.0, seed=seed, max_tokens=200)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.tool_calls, ch.message
        assert len(ch.message.tool_calls) == 1 or parallel
        for tc in ch.message.tool_calls:
            jsonschema.validate(json.loads(tc.function.arguments), SCHEMAS[tc.function.name])
        streamed, finish = stream_calls(c, model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=parallel, temperature=1.0, seed=seed, max_tokens=200)
        assert finish == "tool_calls"
        assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(streamed.items())] == \
            [(tc.function.name, json.loads(tc.function.arguments)) for tc in ch.message.tool_calls]
    wait_idle(server.engine_)


def test_named_choice_always_parses_and_streams_its_arguments(server):
    c = client(server)
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(6):
        r = c.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=named,
                                      temperature=1.0, seed=seed, max_tokens=100)
        (tc,) = r.choices[0].message.tool_calls
        assert tc.function.name == "get_time" and r.choices[0].message.content is None
        jsonschema.validate(json.loads(tc.function.arguments), TIME)
        streamed, _ = stream_calls(c, model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=named,
                                   temperature=1.0, seed=seed, max_tokens=100)
        assert streamed[0]["name"] == "get_time"
        assert json.loads(streamed[0]["arguments"]) == json.loads(tc.function.arguments)


def test_auto_returns_tool_calls_when_the_output_holds_one(server):
    c = client(server)
    # the mock has no idea of tools: force a Hermes block with a grammar to stand in for a model that emits one
    block = json.dumps('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}\n'
                       '</tool_call>')                              # an EBNF string literal
    r = c.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, max_tokens=120, temperature=0,
                                  extra_body={"guided_grammar": f"root ::= {block}"})
    (tc,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert (tc.function.name, json.loads(tc.function.arguments)) == ("get_weather", {"city": "Rome", "unit": "C"})
    r = c.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, max_tokens=5, temperature=0)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "length"
    r = c.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=120,
                                  temperature=0, extra_body={"guided_grammar": f"root ::= {block}"})
    assert not r.choices[0].message.tool_calls and "<tool_call>" in r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required",
                                  response_format={"type": "json_object"})
    assert e.value.body["param"] == "tool_choice"


def test_batch_lines_with_tools(tmp_path):
    from kiln.entrypoints import batch as B
    eng = mock_engine(max_model_len=2048, num_blocks=1024)
    inp = tmp_path / "in.jsonl"
    body = {"messages": MSGS, "tools": TOOLS, "max_tokens": 100, "temperature": 0}
    inp.write_text("".join(json.dumps(x) + "\n" for x in [
        {"custom_id": "named", "url": "/v1/chat/completions", "body": dict(body, tool_choice={
            "type": "function", "function": {"name": "get_time"}})},
        {"custom_id": "required", "url": "/v1/chat/completions", "body": dict(body, tool_choice="required",
                                                                             parallel_tool_calls=False)},
        {"custom_id": "bad", "url": "/v1/chat/completions", "body": dict(body, tool_choice="sometimes")}]))
    B.run_batch(eng, str(inp), tmp_path / "out.jsonl", progress=False)
    recs = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    for cid in ("named", "required"):
        ch = recs[cid]["response"]["body"]["choices"][0]
        (tc,) = ch["message"]["tool_calls"]
        assert ch["finish_reason"] == "tool_calls"
        jsonschema.validate(json.loads(tc["function"]["arguments"]), SCHEMAS[tc["function"]["name"]])
    assert recs["named"]["response"]["body"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == \
        "get_time"
    assert recs["bad"]["response"]["status_code"] == 400 and "tool_choice" in recs["bad"]["error"]["message"]
