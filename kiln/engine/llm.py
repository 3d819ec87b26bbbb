"""The vLLM-style offline API: `LLM(model=...).generate(prompts, SamplingParams(...))` and `.chat(...)`.

Engines are built by kiln.engine.build (`build_engine` is re-exported here for the entrypoints)."""
from __future__ import annotations

import logging
from collections.abc import Sequence

from kiln import config as C
from kiln.engine.build import build_config, build_engine
from kiln.engine.outputs import EmbeddingRequestOutput, RequestOutput
from kiln.engine.pooling import PoolingParams
from kiln.engine.sampling_params import SamplingParams

__all__ = ["LLM", "build_config", "build_engine"]

log = logging.getLogger(__name__)


def _prompt(p):
    """A prompt of vLLM's forms as text or token ids; ValueError for a dict of neither form."""
    if not isinstance(p, dict):
        return p
    if "prompt_token_ids" in p:
        ids = p["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of token ids")
        return list(ids)
    if isinstance(p.get("prompt"), str):
        return p["prompt"]
    raise ValueError(f"a prompt dict needs `prompt` (text) or `prompt_token_ids`, got keys {sorted(p)[:5]}")


class LLM:
    """Offline batched generation. Keyword arguments are `engine.build.build_config`'s (dtype, max_model_len, ...)."""

    def __init__(self, model: str = C.ModelConfig.model, **kwargs):
        self.engine = build_engine(model, **kwargs)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | dict | Sequence[str | dict] | Sequence[list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs in prompt order. A prompt is text, token
        ids, or vLLM's dicts {"prompt": text} / {"prompt_token_ids": [ids]}."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [_prompt(p) for p in prompts]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp or SamplingParams()) for p, sp in zip(prompts, params)]
        return self._run(ids, use_tqdm)

    def embed(self, prompts: str | dict | Sequence[str | dict] | Sequence[list[int]],
              pooling_params: PoolingParams | None = None, use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """The pooled final hidden state of every prompt (vLLM's `LLM.embed`: `out.outputs.embedding`); last-token
        pooling, L2-normalised, unless `pooling_params` says otherwise. Prompts take generate()'s forms."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        pp = pooling_params or PoolingParams()
        ids = [self.engine.add_request(_prompt(p), pp) for p in prompts]
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.tokenizer.apply_chat_template(c) for c in convs], sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", unit="req")
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
        return [done[r] for r in ids]
