"""The tools in the prompt: the chat template renders them when it knows how (`tools` in the template);
otherwise kiln adds them to the system message in the Hermes format (what Qwen2.5's template writes), so the
model learns the tools and the `<tool_call>` format the hermes parser reads."""
from __future__ import annotations

import json

_HERMES_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def with_tools(messages: list[dict], tools: list[dict], template: str | None) -> tuple[list[dict], list | None]:
    """(messages, tools for the template): unchanged where the template renders tools itself, else the tools
    described in the system message (a new one first if there is none)."""
    if template_knows_tools(template):
        return messages, tools
    text = _HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0], content=(messages[0].get("content") or "") + "\n\n" + text)
        return [first, *messages[1:]], None
    return [{"role": "system", "content": text}, *messages], None
