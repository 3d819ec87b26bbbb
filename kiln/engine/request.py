"""A request's state as the scheduler sees it: its tokens, how many have KV computed, its status."""
from __future__ import annotations

import dataclasses
import enum
import time

from kiln.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int                              # resolved: the user's seed, or one drawn at arrival
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0           # tokens whose K/V are in the cache
    num_cached_tokens: int = -1            # prompt tokens served by the prefix cache (first schedule)
    num_preemptions: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None       # stop | length | abort | error (failed by the engine: StepError)
    stop_reason: int | str | None = None   # the stop token id or stop string that ended it
    pooling: str | None = None             # an embedding request: "last" | "mean" (prefill only, no token)
    draft_token_ids: list[int] = dataclasses.field(default_factory=list)   # speculative decoding: drafts
                                           # to verify after the last token in its next decode step

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
