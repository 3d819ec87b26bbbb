"""Prompt encoding and validation, before admission: text, token ids or chat messages -> token ids.

    chat messages ─ check: a non-empty list of at most `max_messages`, each {role, content} with role in
                    ROLES and content text of at most `max_message_chars` ─> the model's chat template
    text          ─ at most `max_prompt_chars` ─> tokenizer (BOS added)
    token ids     ─ as they are
    then the engine's own check (empty, too long for max_model_len, ids outside the vocabulary, sampling
    params the vocabulary or kernels cannot serve)

Every failure is InvalidRequest naming the field (`messages[2].role`, `prompt`, `max_tokens`, ...).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from kiln.engine.sampling_params import SamplingParams
from kiln.serving.errors import InvalidRequest, invalid

ROLES = ("system", "user", "assistant", "tool", "developer")

Prompt = str | list[int] | list[dict[str, str]]


class ChatMessages(list):
    """Chat messages (a list of {role, content, ...}) with the tools the chat template is given (None: none)."""

    def __init__(self, messages=(), tools: list | None = None):
        super().__init__(messages)
        self.tools = tools


@dataclasses.dataclass(frozen=True)
class PromptLimits:
    max_messages: int = 1024               # chat messages per request
    max_message_chars: int = 1 << 20       # characters of one message's content
    max_prompt_chars: int = 4 << 20        # characters of a text prompt, or of all messages together

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be at least 1, got {getattr(self, f.name)}")


def is_chat(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def check_messages(messages: Any, limits: PromptLimits = PromptLimits()) -> list[dict[str, str]]:
    """Chat messages as [{role, content}] after the checks above; raises InvalidRequest naming the field."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > limits.max_messages:
        raise InvalidRequest(f"messages holds {len(messages)} messages; the limit is {limits.max_messages}",
                             "messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if not isinstance(m, dict) or not isinstance(role, str):
            raise InvalidRequest(f"messages[{i}] must be an object with a string role", f"messages[{i}].role")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role is {role[:40]!r}; it must be one of {', '.join(ROLES)}",
                                 f"messages[{i}].role")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        if len(content) > limits.max_message_chars:
            raise InvalidRequest(f"messages[{i}].content is {len(content)} characters; the limit is "
                                 f"{limits.max_message_chars}", f"messages[{i}].content")
        total += len(content)
        msg = {"role": role, "content": content}
        for key in ("tool_calls", "tool_call_id", "name"):     # what tool conversations carry to the template
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    if total > limits.max_prompt_chars:
        raise InvalidRequest(f"messages hold {total} characters in all; the limit is {limits.max_prompt_chars}",
                             "messages")
    return out


def encode(tokenizer, prompt: Prompt, limits: PromptLimits = PromptLimits()) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt; raises InvalidRequest."""
    if isinstance(prompt, str):
        if len(prompt) > limits.max_prompt_chars:
            raise InvalidRequest(f"prompt is {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
                                 "prompt")
        return prompt, tokenizer.encode(prompt)
    if is_chat(prompt):
        messages = check_messages(prompt, limits)
        try:
            tools = getattr(prompt, "tools", None)
            return None, (tokenizer.apply_chat_template(messages, tools=tools) if tools else
                          tokenizer.apply_chat_template(messages))
        except Exception as e:   # noqa: BLE001 - templates raise what they like (jinja errors, ModelError)
            raise InvalidRequest(f"messages cannot be rendered by the model's chat template: {e}",
                                 "messages") from None
    if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise InvalidRequest("prompt must be text, a list of token ids or chat messages", "prompt")
    return None, list(prompt)


def validate(engine, ids: list[int], params: SamplingParams, chat: bool = False) -> None:
    """The engine's check of one prompt and its params (`engine` is the LLMEngine); raises InvalidRequest."""
    try:
        engine.validate(ids, params)
    except ValueError as e:
        raise invalid(e, chat) from None
