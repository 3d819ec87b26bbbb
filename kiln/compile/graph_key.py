"""GraphKey: which compiled graph a step needs, one of the planned buckets (compile/buckets) of a family.

    prefill(batch, seq_len)    decode(batch, num_blocks)    sample(batch, 0 greedy | 1 general)

Warmup (compile/warmup) builds graphs by key, the graph cache (compile/graph_cache) stores them under a
fingerprint that includes the key, and metrics name buckets by `str(key)`. It names shapes, never a backend.
"""
from __future__ import annotations

import dataclasses

SIZE_NAMES = {"prefill": "seq_len", "decode": "blocks", "sample": "general"}


@dataclasses.dataclass(frozen=True)
class GraphKey:
    kind: str          # prefill | decode | sample
    batch: int
    size: int          # prefill: seq_len bucket; decode: num_blocks bucket; sample: 0 greedy, 1 general

    def __str__(self) -> str:
        return f"{self.kind}(batch={self.batch}, {SIZE_NAMES[self.kind]}={self.size})"
