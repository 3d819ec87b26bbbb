"""A request's tools, whatever transport it came by: the OpenAI fields -> the prompt the chat template gets and
the ToolUse that parses the output, with `required` / a named choice set as the request's output grammar."""
from __future__ import annotations

from kiln.engine.sampling_params import SamplingParams
from kiln.tools import parsers, prompt as tool_prompt
from kiln.tools.output import ToolUse
from kiln.tools.spec import from_body


def prepare(fields: dict, messages: list[dict], params: SamplingParams, template: str | None,
            parser: str | None = None) -> tuple[list[dict], list | None, ToolUse | None]:
    """(messages, tools for the chat template, ToolUse) of the OpenAI `tools` / `tool_choice` /
    `parallel_tool_calls` in `fields`; (messages, None, None) when it offers no tools. Sets
    params.structured_outputs for required / named choices. Raises ValueError naming the field."""
    spec = from_body(fields)
    if spec is None:
        return messages, None, None
    constraint = spec.constraint()
    if constraint is not None:
        if params.structured_outputs is not None:
            raise ValueError("tool_choice required or named cannot be combined with response_format or "
                             "another output constraint.")
        params.structured_outputs = constraint
    name = parsers.select(template, parser)
    messages, for_template = tool_prompt.with_tools(messages, spec.template_tools(), template)
    return messages, for_template, ToolUse(spec, name)
