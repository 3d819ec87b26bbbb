"""kiln: LLM inference and serving from graphs compiled ahead of time over bucketed static shapes."""
from kiln.engine.llm import LLM
from kiln.engine.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput
from kiln.engine.pooling import PoolingParams
from kiln.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "PoolingParams", "EmbeddingRequestOutput"]
