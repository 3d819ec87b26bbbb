"""GraphKey: which compiled graph a step needs, one of the planned buckets (compile/buckets) of a family.

    prefill(batch, seq_len)    decode(batch, num_blocks)    sample(batch, 0 greedy | 1 general)
    score(batch, seq_len): a prefill that also returns prompt logprobs and pooled hidden states

Warmup (compile/warmup) builds graphs by key, the graph cache (compile/graph_cache) stores them under a
fingerprint that includes the key, and metrics name buckets by `str(key)`. It names shapes, never a backend.

MeshKey is the other half of a graph's identity: the device mesh it was partitioned for (axis sizes, axis
names, device kind, process count). The same bucket compiled for TP=1 and TP=2 is two different graphs, so the
runner's graph-cache fingerprint holds both `GraphKey` and `MeshKey`.
"""
from __future__ import annotations

import dataclasses

SIZE_NAMES = {"prefill": "seq_len", "decode": "blocks", "sample": "general", "score": "seq_len"}


@dataclasses.dataclass(frozen=True)
class GraphKey:
    kind: str          # prefill | decode | sample | score
    batch: int
    size: int          # prefill: seq_len bucket; decode: num_blocks bucket; sample: 0 greedy, 1 general

    def __str__(self) -> str:
        return f"{self.kind}(batch={self.batch}, {SIZE_NAMES[self.kind]}={self.size})"


@dataclasses.dataclass(frozen=True)
class MeshKey:
    shape: tuple[tuple[str, int], ...] = ()   # (axis name, size) in mesh order; () = one device, no mesh
    device_kind: str = ""
    processes: int = 1

    def as_dict(self) -> dict:
        return {"shape": [list(a) for a in self.shape], "device_kind": self.device_kind, "processes": self.processes}

    def __str__(self) -> str:
        axes = ",".join(f"{a}={n}" for a, n in self.shape) or "single"
        return f"mesh({axes}; {self.device_kind}; {self.processes} process{'es' if self.processes > 1 else ''})"
