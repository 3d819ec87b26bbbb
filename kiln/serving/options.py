"""Settings: ServingOptions for the core (admission, auth, limits, the model's name), ServeOptions for the
`kiln serve` process (what to bind, TLS, drain time), which holds the former's fields flat, as the flags are."""
from __future__ import annotations

import dataclasses

from kiln.serving.prompts import PromptLimits


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    max_queued: int | None = 64           # sequences admitted beyond the running batch (None: no limit)
    api_key: str | None = dataclasses.field(default=None, repr=False)   # require `authorization: Bearer <key>`
    served_model_name: str | None = None  # the name reported and expected (default: the --model value)
    limits: PromptLimits = PromptLimits()
    tool_call_parser: str | None = None   # hermes | llama3_json (None: chosen from the chat template)

    def __post_init__(self):
        if self.tool_call_parser not in (None, "hermes", "llama3_json"):
            raise ValueError(f"--tool-call-parser must be hermes or llama3_json, got {self.tool_call_parser!r}")
        if self.max_queued is not None and self.max_queued < 0:
            raise ValueError(f"--max-queued must be >= 0, got {self.max_queued}")


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int | None = 50051              # gRPC; 0: any free port; None: no gRPC (HTTP only)
    http_port: int | None = None          # the OpenAI-compatible HTTP API (0: any free port; None: none)
    max_queued: int = 64
    drain_seconds: float = 30.0           # SIGTERM: how long in-flight requests may take to finish
    api_key: str | None = dataclasses.field(default=None, repr=False)   # never in a repr, so never in a log
    tls_cert: str | None = None           # PEM files; both or neither
    tls_key: str | None = None
    tls_client_ca: str | None = None      # PEM CA bundle: require and verify client certificates (mTLS)
    metrics_port: int | None = None       # serve Prometheus /metrics there (0: any free port)
    max_message_bytes: int = 16 * 2**20
    served_model_name: str | None = None
    limits: PromptLimits = PromptLimits()
    tool_call_parser: str | None = None

    def __post_init__(self):
        if self.port is None and self.http_port is None:
            raise ValueError("--no-grpc needs --http-port: there would be nothing to serve")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked "
                             "in the TLS handshake")
        self.serving()   # validates the core's fields

    def serving(self) -> ServingOptions:
        return ServingOptions(max_queued=self.max_queued, api_key=self.api_key,
                              served_model_name=self.served_model_name, limits=self.limits,
                              tool_call_parser=self.tool_call_parser)
