"""The torch runner: the JAX runner's contract (SchedulerOutput in, StepResult out) with the model step run
eagerly by backends/torch/model on oneDNN/ATen CPU kernels.

Only the model step differs: batches are padded to the same batch buckets (the sampler graphs, shared with
the JAX backend and built by warmup, are compiled per batch size), but the model itself computes only the
real rows and the real context, so there is no model graph to compile and no sequence-length padding.
"""
from __future__ import annotations

import numpy as np
import torch

from kiln.backends.jax.runner import GraphKey, JaxRunner, StepResult, is_plain_greedy
from kiln.backends.torch import kernels
from kiln.backends.torch import model as TM
from kiln.backends.torch.weights import Weights, load_weights
from kiln.config import EngineConfig
from kiln.models.spec import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TorchRunner(JaxRunner):
    compiled_kinds = ("sample",)

    def __init__(self, spec: ModelSpec, weights: Weights, config: EngineConfig):
        kernels.load()                       # build (first run on this machine) or load the CPU kernels now
        super().__init__(spec, weights, config)

    @staticmethod
    def load_weights(spec: ModelSpec, tensors: dict[str, np.ndarray], config: EngineConfig) -> Weights:
        dtype = DTYPES[config.dtype]
        int4 = config.model.quantization == "auto" and dtype == torch.bfloat16
        return load_weights(spec, tensors, dtype, int4, config.scheduler.max_model_len)

    def _new_cache(self):
        cc, spec = self.config.cache, self.spec
        L, NB, KVH, bs, Dh = spec.num_layers, cc.num_blocks, spec.num_kv_heads, cc.block_size, spec.head_dim
        dtype = DTYPES[self.config.kv_dtype]
        return (torch.zeros((L, NB, KVH, Dh, bs), dtype=dtype),      # K, transposed within a block
                torch.zeros((L, NB, KVH, bs, Dh), dtype=dtype))      # V

    def is_cached(self, key: GraphKey) -> bool:
        return key.kind != "sample" or super().is_cached(key)

    def _graph_for(self, kind: str, batch: int, size: int):
        """Model steps: a batch bucket (for the sampler graph) and the exact size; nothing to compile."""
        if kind == "sample":
            return super()._graph_for(kind, batch, size)
        plan = self.config.buckets
        b = (plan.prefill_bucket(batch, 1) if kind == "prefill" else plan.decode_bucket(batch, 1))[0]
        return GraphKey(kind, b, size), self._step

    def _step(self, weights, k_cache, v_cache, tokens, positions, slots, tables, starts, q_lens=None):
        """The executable's signature: (params, caches, batch...) -> (caches, logits [n, V] float32, torch)."""
        if q_lens is None:                                          # decode: one token per row
            q_lens = np.ones(len(tokens), np.int32)
        logits = TM.forward(self.spec, weights, k_cache, v_cache, self.config.cache.block_size,
                            tokens, positions, slots, tables, q_lens)
        return k_cache, v_cache, logits

    def _sample(self, rows, logits: torch.Tensor, B: int, want_lp: int) -> StepResult:
        """Plain greedy rows without logprobs: the argmax, here; anything else: the JAX sampler graphs."""
        if not want_lp and all(is_plain_greedy(r) for r in rows):
            return StepResult(logits.argmax(-1).tolist(), [0.0] * len(rows), None)
        out = np.zeros((B, logits.shape[1]), np.float32)                         # [B, V] padded
        out[:len(logits)] = logits.numpy()
        return super()._sample(rows, out, B, want_lp)
