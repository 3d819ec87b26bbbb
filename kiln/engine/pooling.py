"""Embeddings: what an embedding request asks for, and how a prompt's hidden states become its vector.

    LLMEngine.add_request(prompt, PoolingParams(pooling="last" | "mean"))
    ─> a prefill-only Request (chunked, admitted and budgeted like any prompt; no prefix-cache hit, so every
       position is computed) ─> per chunk the runner returns (sum of hidden [D], last hidden [D])
       (StepResult.hidden, the final-normed hidden state) ─> Pooled.add per chunk
    ─> after the last chunk: Pooled.embedding() ─> EmbeddingRequestOutput (no token is sampled)

vLLM's defaults for decoder LLMs: last-token pooling, L2-normalised; `mean` averages every prompt position.
"""
from __future__ import annotations

import dataclasses

import numpy as np

POOLING_TYPES = ("last", "mean")


@dataclasses.dataclass
class PoolingParams:
    """vLLM's PoolingParams for embeddings: `pooling` over the final hidden state, then L2 `normalize`."""
    pooling: str = "last"
    normalize: bool = True

    def verify(self) -> None:
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {POOLING_TYPES}, got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {type(self.normalize).__name__}")


@dataclasses.dataclass
class Pooled:
    """The running pool of one prompt: the hidden sum over the positions computed so far and the last one."""
    total: np.ndarray | None = None     # [D] float64
    last: np.ndarray | None = None      # [D] float32
    positions: int = 0

    def add(self, start_pos: int, num_tokens: int, hidden_sum, hidden_last) -> None:
        """One chunk of `num_tokens` positions starting at `start_pos`; a chunk from position 0 starts over
        (a preempted request recomputes its prompt)."""
        if start_pos == 0 or self.total is None:
            self.total, self.positions = np.zeros(len(hidden_sum), np.float64), 0
        self.total += np.asarray(hidden_sum, np.float64)
        self.last = np.asarray(hidden_last, np.float32)
        self.positions = start_pos + num_tokens

    def embedding(self, params: PoolingParams) -> list[float]:
        v = self.last.astype(np.float64) if params.pooling == "last" else self.total / max(self.positions, 1)
        if params.normalize:
            v = v / max(float(np.linalg.norm(v)), 1e-12)     # F.normalize's eps, as vLLM
        return v.astype(np.float32).tolist()
