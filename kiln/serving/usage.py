"""Token counts of a finished request (over all its prompts and samples), as every transport reports them."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from kiln.engine.outputs import RequestOutput


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0         # summed over the n samples
    cached_prompt_tokens: int = 0      # prompt tokens served by the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of(cls, outputs: Iterable[RequestOutput]) -> "Usage":
        outs = list(outputs)
        return cls(prompt_tokens=sum(len(o.prompt_token_ids) for o in outs),
                   completion_tokens=sum(len(c.token_ids) for o in outs for c in o.outputs),
                   cached_prompt_tokens=sum(o.num_cached_tokens for o in outs))

    def openai(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}
