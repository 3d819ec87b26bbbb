"""Tool calling (OpenAI `tools`, `tool_choice`, `parallel_tool_calls`), knowing no wire format beyond the
OpenAI shapes:

    request.prepare (HTTP and gRPC): the OpenAI fields -> template prompt + ToolUse, as below
    body ── spec.from_body ──> ToolSpec (functions, choice, parallel)
        choice required / named ── spec.constraint ──> a JSON Schema for the grammar engine (always parses)
        the chat template gets the tools (prompt.with_tools adds Hermes-style instructions where the
        model's template has no tool support)
    output text ── parsers (hermes `<tool_call>` JSON, llama3 JSON; selected from the template or by name)
                ──> content + tool_calls;  stream.ToolStream does the same incrementally for streams
"""
