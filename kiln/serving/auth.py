"""API-key auth: `Authorization: Bearer <key>` (an HTTP header or gRPC metadata), compared in constant time."""
from __future__ import annotations

import hmac

from kiln.serving.errors import Unauthenticated


class ApiKey:
    def __init__(self, key: str):
        if not key:
            raise ValueError("the API key is empty")
        self._expected = f"Bearer {key}".encode()

    def check(self, authorization: str | bytes | None) -> None:
        """Raise Unauthenticated unless `authorization` is exactly `Bearer <key>`."""
        got = authorization or b""
        got = got.encode() if isinstance(got, str) else got
        if not hmac.compare_digest(got, self._expected):
            why = "missing authorization" if not got else "invalid API key"
            raise Unauthenticated(f"{why}: send 'authorization: Bearer <key>'")
