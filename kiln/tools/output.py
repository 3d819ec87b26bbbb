"""Output text -> OpenAI tool calls, whole (`message`) or streamed (`ToolStream`), for one request's ToolUse.

    auto      the family parser (parsers.py) reads `<tool_call>` blocks / Llama JSON; plain text stays content
    required  the grammar made the output a JSON array of {name, parameters}: every element is a call
    named     the grammar made the output the function's arguments: one call
    none      no parsing
Streams: content deltas pass through until a tool call may begin (text that could be the start of
`<tool_call>` is held back); a named call streams its arguments as they are generated; a hermes call is sent
when its block closes (name first, then its arguments); a required array when it is complete.
"""
from __future__ import annotations

import dataclasses
import uuid

from kiln.tools import parsers
from kiln.tools.spec import ToolSpec, calls_from_constrained

_OPEN = "<tool_call>"


@dataclasses.dataclass
class ToolUse:
    spec: ToolSpec
    parser: str                          # parsers.PARSERS


def _call_id() -> str:
    return "chatcmpl-tool-" + uuid.uuid4().hex[:24]


def calls(use: ToolUse, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments JSON)]) of a finished output."""
    mode = use.spec.choice
    if mode == "none":
        return text, []
    if mode in ("required", "named"):
        try:
            return None, calls_from_constrained(use.spec, text)
        except ValueError:               # cut short by max_tokens: not a complete call
            return text, []
    return parsers.parse(use.parser, text)


def message(use: ToolUse, text: str) -> tuple[dict, bool]:
    """The assistant message of a finished output and whether it holds tool calls."""
    content, found = calls(use, text)
    msg = {"role": "assistant", "content": content}
    if found:
        msg["tool_calls"] = [{"id": _call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                             for n, a in found]
    return msg, bool(found)


class ToolStream:
    """One choice's deltas: feed(text) -> delta fields to send now; finish() -> the rest (and whether calls
    were made, for finish_reason)."""

    def __init__(self, use: ToolUse):
        self.use, self.text, self.sent_content, self.n_calls = use, "", 0, 0
        self.named_started = False

    def _content_limit(self) -> int:
        """How much of the text is surely content (the rest may be, or begin, a tool call)."""
        choice = self.use.spec.choice
        if choice == "none":
            return len(self.text)
        if choice in ("required", "named"):
            return 0
        if self.use.parser == "llama3_json":          # a call is the whole output: decided by its first chars
            head = self.text.lstrip()
            maybe_call = not head or head[0] == "{" or head.startswith("<|python_tag|>") or \
                "<|python_tag|>".startswith(head)
            return 0 if maybe_call and self.sent_content == 0 else len(self.text)
        at = self.text.find(_OPEN)
        if at >= 0:
            return at
        for k in range(min(len(_OPEN) - 1, len(self.text)), 0, -1):   # a possible start of <tool_call>
            if _OPEN.startswith(self.text[-k:]):
                return len(self.text) - k
        return len(self.text)

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        out = []
        if self.use.spec.choice == "named":
            if not self.named_started:
                self.named_started = True
                out.append({"tool_calls": [{"index": 0, "id": _call_id(), "type": "function",
                                            "function": {"name": self.use.spec.named, "arguments": ""}}]})
            if delta:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
            return out
        limit = self._content_limit()
        if limit > self.sent_content:
            out.append({"content": self.text[self.sent_content:limit]})
            self.sent_content = limit
        if self.use.parser == "hermes" and self.use.spec.choice == "auto":
            _, found = parsers.parse_hermes(self.text[:self.text.rfind("</tool_call>") + len("</tool_call>")]
                                            if "</tool_call>" in self.text else "")
            out += self._calls(found)
        return out

    def _calls(self, found: list[tuple[str, str]]) -> list[dict]:
        out = []
        for name, args in found[self.n_calls:]:
            i = self.n_calls
            out.append({"tool_calls": [{"index": i, "id": _call_id(), "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": args}}]})
            self.n_calls += 1
        return out

    def finish(self) -> tuple[list[dict], bool]:
        if self.use.spec.choice == "named":
            return [], self.named_started
        content, found = calls(self.use, self.text)
        out = []
        if not found and len(self.text) > self.sent_content:       # it was content after all
            out.append({"content": self.text[self.sent_content:]})
            self.sent_content = len(self.text)
        out += self._calls(found)
        return out, self.n_calls > 0
