"""Tool-call parsers per model family: the finished output text -> (content, [(name, arguments JSON)]).

    hermes       <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>   (Qwen2.5, SmolLM2, Hermes)
    llama3_json  {"name": ..., "parameters": {...}}, optionally after <|python_tag|>, `;`-separated   (Llama 3.x)

`select(template, name)`: the named parser, or the one the chat template's own tool format implies (hermes
when the template has none: kiln then describes the tools in Hermes' format, prompt.py).
"""
from __future__ import annotations

import json
import re

PARSERS = ("hermes", "llama3_json")

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _call(obj, args_key: str) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):        # some models emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def parse_hermes(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = []
    for body in _HERMES.findall(text[start:]):
        try:
            call = _call(json.loads(body), "arguments")
        except ValueError:
            call = None
        if call is None:
            return text, []           # a malformed call: the text stays content, as vLLM does
        calls.append(call)
    content = text[:start].strip()
    return content or None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    if not body.startswith("{"):
        return text, []
    dec, calls, i = json.JSONDecoder(), [], 0
    while i < len(body):
        try:
            obj, end = dec.raw_decode(body, i)
        except ValueError:
            return text, []
        call = _call(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        i = end
        while i < len(body) and body[i] in " \n\t;":
            i += 1
    return None, calls


def select(template: str | None, name: str | None = None) -> str:
    """The parser's name: `name` if given (ValueError if unknown), else implied by the chat template."""
    if name is not None:
        if name not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got {name!r}")
        return name
    t = template or ""
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return "hermes"


def parse(parser: str, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    return parse_hermes(text) if parser == "hermes" else parse_llama3_json(text)
