"""/tokenize and /detokenize as vLLM's server shapes them, knowing no transport:

    {"prompt": text, "add_special_tokens": true, "return_token_strs": false}
    {"messages": [...], "add_generation_prompt": true}     -> {"count", "max_model_len", "tokens", "token_strs"}
    {"tokens": [ids]}                                      -> {"prompt": text}
Errors are InvalidRequest naming the field.
"""
from __future__ import annotations

from kiln.serving import prompts as P
from kiln.serving.errors import InvalidRequest


def tokenize(engine, body: dict, limits: P.PromptLimits = P.PromptLimits()) -> dict:
    """`engine` is the AsyncEngine."""
    tok = engine.tokenizer
    if "messages" in body:
        messages = P.check_messages(body["messages"], limits)
        gen = body.get("add_generation_prompt", True)
        if not isinstance(gen, bool):
            raise InvalidRequest("add_generation_prompt must be true or false", "add_generation_prompt")
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - templates raise what they like
            raise InvalidRequest(f"messages cannot be rendered by the model's chat template: {e}",
                                 "messages") from None
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt must be a string (or send messages)", "prompt")
        if len(prompt) > limits.max_prompt_chars:
            raise InvalidRequest(f"prompt is {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
                                 "prompt")
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise InvalidRequest("add_special_tokens must be true or false", "add_special_tokens")
        ids = tok.encode(prompt, add_special_tokens=add)
    strs = tok.convert_ids_to_tokens(ids) if body.get("return_token_strs") is True else None
    return {"count": len(ids), "max_model_len": engine.engine.config.scheduler.max_model_len, "tokens": ids,
            "token_strs": strs}


def detokenize(engine, body: dict) -> dict:
    ids = body.get("tokens")
    vocab = engine.engine.spec.vocab_size
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidRequest("tokens must be a list of token ids", "tokens")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"tokens holds {bad[0] if abs(bad[0]) < 2**64 else 'a huge integer'}, outside the "
                             f"vocabulary [0, {vocab})", "tokens")
    try:
        text = engine.tokenizer.decode(ids, skip_special_tokens=False)
        text.encode("utf-8")
    except (ValueError, OverflowError, TypeError) as e:
        raise InvalidRequest(f"tokens cannot be decoded: {e}", "tokens") from None
    return {"prompt": text}
