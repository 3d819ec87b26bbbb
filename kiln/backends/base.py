"""The one contract between the engine and a device: `ModelRunner`.

    LLMEngine ── SchedulerOutput ──> runner.execute(step) ──> StepResult   (one call per engine step)
    kiln warmup / LLM(...) ──> runner.warmup(check_only=...) ──> WarmupReport
    planner ──> Runner.kv_bytes_per_block(...) (before the runner exists: it sizes the KV cache)
    metrics ──> runner.stats() ──> RunnerStats

Every backend (jax, torch, mock) implements this interface and nothing else is asked of it; the engine, the
scheduler and the servers import this module, never a concrete backend (backends/registry.py builds one by
name). No backend subclasses another, and backends/jax and backends/torch never import each other: what they
share is host-side (backends/inputs.py: the padded step arrays and the sampling parameters of a batch).
Methods take keyword arguments only, except `execute`'s one step.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from kiln.compile.warmup import WarmupReport
    from kiln.config import EngineConfig
    from kiln.engine.scheduler_output import SchedulerOutput
    from kiln.models.spec import ModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class StepResult:
    """What one step produced, row for row with the SchedulerOutput (rows with sample=False: ignore)."""
    tokens: list[int]                          # the sampled token of each row
    logprobs: list[float]                      # its logprob under the raw logits (0.0 when no row asked)
    top: list[list[tuple[int, float]]] | None  # per row top-N (token, logprob), when some row asked
    # prompt logprobs, per row: None, or per chunk position j the (logprob of the next prompt token, top-N of
    # that position) -- rows whose SamplingParams.prompt_logprobs is set; the chunk's last position only when
    # next_token_id >= 0
    prompt_logprobs: list | None = None
    # pooled hidden states, per row: None, or (sum over the chunk's positions [D], the chunk's last position
    # [D]) of the final-normed hidden state, float32 numpy -- rows with ScheduledRow.pooling set (embeddings);
    # the engine adds the chunks' sums up and pools after the prompt's last chunk
    hidden: list | None = None
    # speculative decoding, per row: None, or for a row with ScheduledRow.num_draft > 0 its num_draft + 1 tokens
    # sampled at its last num_draft + 1 positions, position j as output output_index + j after the drafts
    # before it (engine/speculative.accepted keeps the drafts that match); tokens[i] is spec_tokens[i][0]
    spec_tokens: list[list[int] | None] | None = None


@dataclasses.dataclass
class RunnerStats:
    """Counters of one runner since it was built; what `/metrics` and `LLMEngine.stats()` report."""
    steps: int = 0                     # execute() calls
    real_tokens: int = 0               # tokens of the scheduled rows (what the scheduler asked for)
    computed_tokens: int = 0           # token positions the model step really computed, padding included:
                                       # jax the bucket's B x T, torch its rows x their padded length, mock real
    compiles: int = 0                  # graphs compiled by this runner (0 for an eager backend)
    compiles_while_serving: int = 0    # ... after warmup (should stay 0)
    graph_cache_hits: int = 0          # graphs loaded from the persistent graph cache
    padding_by_bucket: dict[str, int] = dataclasses.field(default_factory=dict)  # step shape -> padded positions

    def add_step(self, bucket: str, real: int, computed: int) -> None:
        """Count one executed step of `real` scheduled tokens that computed `computed` positions."""
        self.steps += 1
        self.real_tokens += real
        self.computed_tokens += computed
        self.padding_by_bucket[bucket] = self.padding_by_bucket.get(bucket, 0) + computed - real

    @property
    def padding_tokens(self) -> int:
        """Positions computed for padding (computed - real)."""
        return self.computed_tokens - self.real_tokens


class ModelRunner(abc.ABC):
    """Owns a model's weights and KV cache on one device and runs scheduled steps over them."""

    name: ClassVar[str]                # the --backend value that selects it

    @abc.abstractmethod
    def __init__(self, *, spec: ModelSpec, config: EngineConfig, tensors: dict[str, Any]):
        """Build the weights from HF-named host tensors (`tensors`, read only here) and allocate the KV cache."""

    @abc.abstractmethod
    def execute(self, step: SchedulerOutput) -> StepResult:
        """Run one scheduled step: write the rows' K/V, sample the rows with sample=True."""

    @abc.abstractmethod
    def warmup(self, *, check_only: bool = False, show_progress: bool = True) -> WarmupReport:
        """Build (or with check_only, only look up) what serving needs, so that nothing compiles afterwards."""

    @abc.abstractmethod
    def stats(self) -> RunnerStats:
        """A snapshot of this runner's counters."""

    def prompt_logprobs_unavailable(self) -> str | None:
        """Why this runner cannot score prompts now (prompt_logprobs, echo, embeddings: the steps that return
        more than the last position's logits), or None when it can."""
        return None

    @classmethod
    def kv_bytes_per_block(cls, *, spec: ModelSpec, block_size: int, kv_dtype: str) -> int:
        """Bytes of K and V one cache block takes on this backend (the planner sizes the cache with it)."""
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * DTYPE_BYTES[kv_dtype]

    @classmethod
    def from_params(cls, *, spec: ModelSpec, config: EngineConfig, params: Any) -> ModelRunner:
        """A runner over weights this backend already built (tests and scripts that hold them); a backend that
        supports it implements `_setup(spec, config, params)`, which its __init__ calls after building them."""
        runner = cls.__new__(cls)
        runner._setup(spec, config, params)
        return runner

    def with_config(self, *, config: EngineConfig) -> ModelRunner:
        """Another runner over this one's weights with its own config and KV cache (engine variants of one
        loaded model: tests, benchmarks)."""
        return self.from_params(spec=self.spec, config=config, params=self.params)

    def _setup(self, spec: ModelSpec, config: EngineConfig, params: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot share its weights")

    def close(self) -> None:
        """Release what the runner holds beyond memory (listeners, threads). Optional."""
