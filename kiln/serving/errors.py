"""Why a request cannot be served, as kiln's own types; each transport maps them to its codes.

    error            gRPC status          HTTP (OpenAI error body `type`)
    InvalidRequest   INVALID_ARGUMENT     400 invalid_request_error   (`field` -> `param`)
    Unauthenticated  UNAUTHENTICATED      401 invalid_request_error   (code invalid_api_key)
    NotFound         NOT_FOUND            404 invalid_request_error   (`field` -> `param`)
    Conflict         ALREADY_EXISTS       409 invalid_request_error
    Overloaded       RESOURCE_EXHAUSTED   429 rate_limit_error
    Unavailable      UNAVAILABLE          503 server_error            (warming up, draining, engine stopped)
    Internal         INTERNAL             500 server_error            (the engine failed this request)

The serving core raises these and nothing transport-shaped; grpc_server.py and openai_protocol.py hold the
two tables above as code.
"""
from __future__ import annotations

# Request fields that an engine or SamplingParams message may start with (its first word names the field).
_FIELDS = frozenset((
    "model", "prompt", "messages", "text", "token_ids", "chat", "request_id", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop", "stop_token_ids", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "ignore_eos", "min_tokens",
    "best_of", "include_stop_str_in_output", "skip_special_tokens", "response_format", "tools", "functions",
    "suffix", "echo", "stream", "stream_options", "use_beam_search", "prompt_logprobs",
    "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_json_object",
    "guided_whitespace_pattern", "tool_choice", "parallel_tool_calls"))


class ServingError(Exception):
    """A request that cannot be served; `message` is meant for the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(ServingError):
    """Bad input; `field` names the request field it is about (e.g. `messages[1].role`), when known."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Unauthenticated(ServingError):
    """No API key, or the wrong one."""


class NotFound(ServingError):
    """The request names something this server does not have (a model)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Conflict(ServingError):
    """A client-chosen request id that is already in flight."""


class Overloaded(ServingError):
    """Admission refused: the running batch and the queue are full. Retry later."""


class Unavailable(ServingError):
    """The server is not serving: warming up, draining, or its engine stopped. Retry on another replica."""


class Internal(ServingError):
    """The engine failed this request after it was admitted."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(f"{message} (request {request_id})" if request_id else message)
        self.request_id = request_id


def field_of(message: str, chat: bool = False) -> str | None:
    """The request field a validation message is about: its first word, when that names a field.

    Engine and SamplingParams messages start with the field (`max_tokens must be at least 1`); the
    prompt's are about `prompt`, which for a chat request is `messages`."""
    word = message.split(" ", 1)[0].split("[", 1)[0].split(".", 1)[0].rstrip(":,")
    if word == "prompt_token_ids":
        word = "prompt"
    if chat and word == "prompt":
        return "messages"
    return word if word in _FIELDS else None


def invalid(error: ValueError, chat: bool = False) -> InvalidRequest:
    """An engine or SamplingParams ValueError as InvalidRequest, with the field its message names."""
    message = str(error)
    return InvalidRequest(message, field_of(message, chat))
