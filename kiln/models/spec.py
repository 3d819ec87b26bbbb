"""Architecture spec: what a model computes, as data. One frozen object every other part (weights, kernels,
graphs, cache keys) takes its shape from.

A `ModelSpec` holds the model-wide dimensions and a `LayerSpec` per decoder layer. A layer is an attention
(`AttentionSpec`, with its `RopeSpec`), an MLP (`MlpSpec`, or `MoeSpec` for a mixture of experts) and where
its norms sit (`pre`: Llama; `post`: after each block; `sandwich`: both, Gemma 2/3). Families (models/llama.py,
models/qwen2.py, ...) turn a `config.json` into this; backends write one decoder layer over it and reject,
through `features()`, what they do not implement yet. The objects are hashable: JAX graphs take the spec as a
static argument.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal


class ModelError(ValueError):
    """A model that cannot be loaded: bad path, unsupported architecture, missing or mis-shaped tensor."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """Position interpolation (`rope_type: linear`): every frequency divided by `factor` (Gemma 3 global layers)."""
    factor: float


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    theta: float
    scaling: RopeScaling | LinearRopeScaling | None = None   # None: plain RoPE
    rotary_dim: int | None = None     # partial rotary (Phi-3 partial_rotary_factor): the first dims rotate;
                                      # the family's layout permutes q/k rows so backends see full-width RoPE
                                      # with zero frequency on the rest (kernels/rope.inv_frequencies)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    rope: RopeSpec
    kind: Literal["global", "sliding"] = "global"
    window: int | None = None             # tokens a query sees (itself included) when kind == "sliding"
    qkv_bias: bool = False                # bias on the q/k/v projections (Qwen2; Llama `attention_bias`)
    o_bias: bool = False                  # bias on the output projection (Llama `attention_bias` only)
    qk_norm: bool = False                 # RMS norm over head_dim of q and k before RoPE (Qwen3, Gemma 3)
    logit_softcap: float | None = None    # scores -> cap * tanh(scores / cap) (Gemma 2)
    scale: float | None = None            # score scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)

    def __post_init__(self):
        if (self.kind == "sliding") != (self.window is not None):
            raise ModelError(f"attention kind {self.kind!r} with window={self.window}: a window is given "
                             f"exactly when the attention is sliding")


@dataclasses.dataclass(frozen=True)
class MlpSpec:
    intermediate_size: int
    kind: Literal["gated"] = "gated"      # down(act(gate(x)) * up(x))
    act: Literal["silu", "gelu_tanh"] = "silu"
    bias: bool = False                    # bias on gate, up and down


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """A mixture of gated experts (Mixtral, Qwen3-MoE): a router picks top_k of num_experts per token."""
    num_experts: int
    top_k: int
    intermediate_size: int                # of each expert
    norm_topk: bool = True                # renormalise the chosen experts' router weights to sum to 1
    shared_expert_size: int | None = None # an always-on gated expert beside the routed ones (Qwen2-MoE)
    act: Literal["silu", "gelu_tanh"] = "silu"


@dataclasses.dataclass(frozen=True)
class NormSpec:
    eps: float
    kind: Literal["rms", "rms_plus_one"] = "rms"   # rms_plus_one: x / rms(x) * (1 + weight), Gemma


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    attention: AttentionSpec
    mlp: MlpSpec | MoeSpec
    norms: Literal["pre", "post", "sandwich"] = "pre"   # where each block's norms sit around its residual add


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    architecture: str                     # the HF architecture name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm: NormSpec                        # every norm of the model: layers', q/k's and the final one
    layers: tuple[LayerSpec, ...]
    tie_word_embeddings: bool             # the head is the embedding matrix
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    embed_scale: float | None = None      # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    final_logit_softcap: float | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if not self.layers:
            raise ModelError("a model needs at least one layer")

    # -- conveniences over the layers -------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rms_norm_eps(self) -> float:
        return self.norm.eps

    @property
    def intermediate_size(self) -> int:
        """The MLP width (of each expert, for MoE layers), where every layer shares one."""
        return self._shared(lambda l: l.mlp.intermediate_size, "intermediate_size")

    @property
    def rope_theta(self) -> float:
        """The RoPE base, where every layer shares one (else read spec.layers[i].attention.rope)."""
        return self._shared(lambda l: l.attention.rope.theta, "rope_theta")

    @property
    def rope_scaling(self) -> RopeScaling | LinearRopeScaling | None:
        return self._shared(lambda l: l.attention.rope.scaling, "rope_scaling")

    @property
    def sliding_window(self) -> int | None:
        """The smallest attention window of any sliding layer (Mistral v0.1, Qwen2 use_sliding_window, Gemma 3's
        local layers); None when every layer attends globally."""
        return min((l.attention.window for l in self.layers if l.attention.kind == "sliding"), default=None)

    def _shared(self, get: Callable[[LayerSpec], Any], what: str) -> Any:
        values = {get(l) for l in self.layers}
        if len(values) != 1:
            raise ModelError(f"{self.architecture}: layers differ in {what}; read it from spec.layers[i]")
        return values.pop()

    def features(self) -> set[str]:
        """Names of what this model uses beyond a plain pre-norm Llama layer, for a backend to check against
        what it implements: `ModelError` naming the rest beats a wrong answer. Biases and RoPE scaling are not
        listed: every backend has them (RoPE frequencies come from kernels/rope.inv_frequencies for all)."""
        f = set().union(*(_layer_features(l) for l in self.layers))
        if len({_structure(l) for l in self.layers}) > 1:
            f.add("layers of different structure")
        if len({l.attention.rope for l in self.layers}) > 1:
            f.add("per-layer rope")
        used = {"embedding scale": self.embed_scale is not None,
                "final logit softcap": self.final_logit_softcap is not None,
                f"{self.norm.kind} norm": self.norm.kind != "rms"}
        return f | {name for name, on in used.items() if on}

    def check_supported(self, backend: str, implemented: set[str] = frozenset()) -> None:
        """ModelError naming every feature of this model that `backend` does not implement."""
        missing = sorted(self.features() - set(implemented))
        if missing:
            raise ModelError(f"{self.architecture}: the {backend} backend does not implement "
                             f"{', '.join(missing)} yet")

    def shape_key(self) -> dict[str, Any]:
        """Everything about the architecture that changes a compiled graph: not weight values, not token ids."""
        key = dataclasses.asdict(self)
        for name in ("bos_token_id", "eos_token_ids"):
            del key[name]
        return key

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelSpec":
        """config.json (as a dict) -> spec, by the family its architecture belongs to (models/registry.py)."""
        from kiln.models.registry import spec_from_config
        return spec_from_config(cfg)


def _layer_features(layer: LayerSpec) -> set[str]:
    a, m = layer.attention, layer.mlp
    used = {"qk_norm": a.qk_norm, "attention logit softcap": a.logit_softcap is not None,
            "attention scale": a.scale is not None,
            "mixture of experts": isinstance(m, MoeSpec), f"{layer.norms}-norm layers": layer.norms != "pre",
            f"{m.act} activation": m.act != "silu"}
    return {name for name, on in used.items() if on}


def _structure(layer: LayerSpec) -> LayerSpec:
    """The layer with what only changes values (the attention span, RoPE) taken out: layers equal here run the
    same code. The window is a per-layer value every backend's layer takes as an argument."""
    rope = RopeSpec(0.0)
    return dataclasses.replace(layer, attention=dataclasses.replace(
        layer.attention, kind="global", window=None, rope=rope))
