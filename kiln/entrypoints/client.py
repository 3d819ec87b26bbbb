"""A small client of `kiln serve` (kiln.v1.Inference), and `kiln client "prompt"` streaming to the terminal.

    with KilnClient("127.0.0.1:50051", api_key=...) as c:
        for delta in c.generate("Once upon a time", max_tokens=32, temperature=0):
            print(delta.text, end="")
"""
from __future__ import annotations

import json

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from kiln.proto import inference_pb2 as pb
from kiln.proto import inference_pb2_grpc as pb_grpc


def generate_request(prompt: str | list[int] | list[dict[str, Any]], request_id: str = "",
                     tools: list[dict] | None = None, tool_choice: str | dict | None = None,
                     parallel_tool_calls: bool | None = None, **sampling: Any) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt (text, token ids or chat messages: OpenAI's dicts, an assistant's
    `tool_calls` and a tool's `tool_call_id` included), OpenAI-style `tools` / `tool_choice` for a chat prompt,
    and SamplingParams keyword arguments."""
    req = pb.GenerateRequest(request_id=request_id)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and isinstance(prompt[0], dict):
        req.chat.messages.extend(_chat_message(m) for m in prompt)
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    if tools is not None:
        req.tools = json.dumps(tools)
    if tool_choice is not None:
        req.tool_choice = tool_choice if isinstance(tool_choice, str) else json.dumps(tool_choice)
    if parallel_tool_calls is not None:
        req.parallel_tool_calls = parallel_tool_calls
    sp = req.sampling_params
    for k, v in sampling.items():
        if v is None:
            continue
        if k == "stop":
            sp.stop.extend([v] if isinstance(v, str) else v)
        elif k == "stop_token_ids":
            sp.stop_token_ids.extend(v)
        elif k == "logit_bias":
            sp.logit_bias.update({int(t): float(b) for t, b in v.items()})
        elif k == "choice":                 # structured outputs: choice=[...], json_schema=dict or text, ...
            sp.choice.choices.extend(v)
        elif k == "json_schema" and not isinstance(v, str):
            sp.json_schema = json.dumps(v)
        else:
            setattr(sp, k, v)
    return req


def _chat_message(m: dict[str, Any]) -> pb.ChatMessage:
    calls = [pb.ToolCall(index=i, id=c.get("id", ""), name=c["function"]["name"],
                         arguments=c["function"].get("arguments", ""))
             for i, c in enumerate(m.get("tool_calls") or [])]
    return pb.ChatMessage(role=m["role"], content=m.get("content") or "", tool_calls=calls,
                          tool_call_id=m.get("tool_call_id", ""))


class KilnClient:
    """Blocking client. `target` is host:port; TLS when `tls_ca` (a PEM file of the server's CA) is given, and
    with `tls_cert`/`tls_key` (PEM files) it presents that client certificate (for `--tls-client-ca` servers)."""

    def __init__(self, target: str = "127.0.0.1:50051", api_key: str | None = None, tls_ca: str | None = None,
                 options: list[tuple[str, Any]] | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None):
        opts = options or []
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if tls_cert and not tls_ca:
            raise ValueError("a client certificate (--tls-cert) needs --tls-ca: it is sent over TLS only")
        if tls_ca:
            creds = grpc.ssl_channel_credentials(
                Path(tls_ca).read_bytes(), private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def generate(self, prompt, request_id: str = "", timeout: float | None = None,
                 **sampling: Any) -> Iterator[pb.GenerateResponse]:
        """Stream the deltas (text, token ids, per sample index); the last one carries usage."""
        return self.stub.Generate(generate_request(prompt, request_id, **sampling), timeout=timeout,
                                  metadata=self.metadata)

    def generate_unary(self, prompt, request_id: str = "", timeout: float | None = None,
                       **sampling: Any) -> pb.GenerateReply:
        return self.stub.GenerateUnary(generate_request(prompt, request_id, **sampling), timeout=timeout,
                                       metadata=self.metadata)

    def tokenize(self, text: str | list[dict[str, str]], add_special_tokens: bool | None = None) -> list[int]:
        req = pb.TokenizeRequest()
        if isinstance(text, str):
            req.text = text
        else:
            req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in text)
        if add_special_tokens is not None:
            req.add_special_tokens = add_special_tokens
        return list(self.stub.Tokenize(req, metadata=self.metadata).token_ids)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool | None = None) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids)
        if skip_special_tokens is not None:
            req.skip_special_tokens = skip_special_tokens
        return self.stub.Detokenize(req, metadata=self.metadata).text

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.ModelInfoRequest(), metadata=self.metadata)

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), metadata=self.metadata).found

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "KilnClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cmd_client(a) -> int:
    prompt = " ".join(a.prompt)
    msg = [{"role": "user", "content": prompt}] if a.chat else prompt
    with KilnClient(a.target, api_key=a.api_key, tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key) as c:
        try:
            for d in c.generate(msg, max_tokens=a.max_tokens, temperature=a.temperature, timeout=a.timeout):
                sys.stdout.write(d.text)
                sys.stdout.flush()
                if d.HasField("usage"):
                    print(f"\n[{d.finish_reason}; prompt {d.usage.prompt_tokens} tokens, "
                          f"completion {d.usage.completion_tokens}, cached {d.usage.cached_prompt_tokens}]",
                          file=sys.stderr)
        except grpc.RpcError as e:
            print(f"kiln: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print()
    return 0
