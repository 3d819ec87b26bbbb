"""ModelSpec.from_hf_config: every supported architecture, from hand-written config.json dicts (the
transformers 4.x shape, `rope_theta` / `rope_scaling`) and from configs transformers 5 writes (`rope_parameters`),
down to the per-layer specs (attention, RoPE, MLP) every backend's decoder layer reads."""
from __future__ import annotations

import json

import pytest

from kiln.models.registry import SUPPORTED_ARCHITECTURES
from kiln.models.spec import (AttentionSpec, LayerSpec, LinearRopeScaling, MlpSpec, ModelError, ModelSpec, NormSpec,
                              RopeScaling, RopeSpec)

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
         "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 4096,
         "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def spec(**overrides) -> ModelSpec:
    return ModelSpec.from_hf_config({**LLAMA, **overrides})


def test_llama_plain():
    s = spec()
    assert (s.architecture, s.vocab_size, s.hidden_size, s.intermediate_size, s.num_layers) == \
        ("LlamaForCausalLM", 1000, 64, 128, 3)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.q_per_kv) == (8, 2, 8, 4)
    assert (s.rms_norm_eps, s.rope_theta, s.max_position_embeddings) == (1e-5, 500000.0, 4096)
    assert not s.tie_word_embeddings and s.rope_scaling is None and s.bos_token_id == 1 and s.eos_token_ids == (2,)
    assert s.norm == NormSpec(1e-5) and s.embed_scale is None and s.final_logit_softcap is None
    plain = LayerSpec(AttentionSpec(RopeSpec(500000.0)), MlpSpec(128))
    assert s.layers == (plain,) * 3 and s.features() == set()
    assert s.sliding_window is None


def test_llama_attention_bias_is_qkv_and_o():
    a, m = spec().layers[0].attention, spec().layers[0].mlp
    assert not (a.qkv_bias or a.o_bias or m.bias)
    for layer in spec(attention_bias=True, mlp_bias=True).layers:
        assert layer.attention.qkv_bias and layer.attention.o_bias and layer.mlp.bias
    assert not spec(attention_bias=True).layers[0].mlp.bias


def test_head_dim_override():
    assert spec(head_dim=24).head_dim == 24
    assert spec(head_dim=None).head_dim == 64 // 8


def test_kv_heads_default_to_heads_and_must_divide():
    cfg = dict(LLAMA)
    del cfg["num_key_value_heads"]
    assert ModelSpec.from_hf_config(cfg).num_kv_heads == 8
    with pytest.raises(ModelError, match="num_key_value_heads=3"):
        spec(num_key_value_heads=3)


def test_llama3_rope_scaling_parsed():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    assert spec(rope_scaling=rs).rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    old_style = {**rs, "type": rs.pop("rope_type")}           # older configs say "type"
    assert spec(rope_scaling=old_style).rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert spec(rope_scaling={"rope_type": "default"}).rope_scaling is None
    scaled = RopeSpec(500000.0, RopeScaling(8.0, 1.0, 4.0, 8192))
    assert {l.attention.rope for l in spec(rope_scaling=old_style).layers} == {scaled}


def test_linear_rope_scaling_parsed_and_rope_parameters_read():
    s = spec(rope_theta=None, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4})
    assert s.layers[0].attention.rope == RopeSpec(1e4, LinearRopeScaling(4.0))
    assert s.features() == set()                               # kernels/rope.py serves every backend


def test_unsupported_rope_scaling_and_activation_rejected():
    with pytest.raises(ModelError, match="unsupported rope_scaling type 'yarn'"):
        spec(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelError, match="unsupported hidden_act 'relu'"):
        spec(hidden_act="relu")
    assert spec(hidden_act="gelu_pytorch_tanh").features() == {"gelu_tanh activation"}


def test_eos_list_and_missing():
    assert spec(eos_token_id=[2, 7]).eos_token_ids == (2, 7)
    assert spec(eos_token_id=None).eos_token_ids == ()


def test_mistral_sliding_window_makes_every_layer_sliding():
    s = spec(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    assert s.architecture == "MistralForCausalLM" and s.num_kv_heads == 2
    assert all(l.attention.kind == "global" and not l.attention.qkv_bias for l in s.layers)
    s = spec(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096)
    assert {l.attention for l in s.layers} == {AttentionSpec(RopeSpec(500000.0), kind="sliding", window=4096)}
    assert s.sliding_window == 4096 and s.features() == set()   # every backend runs windows
    assert spec(sliding_window=4096).sliding_window is None      # transformers' Llama has no window


def test_qwen2_has_qkv_bias_but_no_o_bias():
    s = spec(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True)
    assert s.architecture == "Qwen2ForCausalLM" and s.tie_word_embeddings
    assert all(l.attention.qkv_bias and not l.attention.o_bias and not l.mlp.bias for l in s.layers)
    assert spec(architectures=["Qwen2ForCausalLM"], attention_bias=False).layers[0].attention.qkv_bias


def test_qwen2_sliding_layers_from_max_window_layers_or_layer_types():
    qwen = dict(architectures=["Qwen2ForCausalLM"], sliding_window=16, max_window_layers=1)
    assert spec(**qwen).sliding_window is None                    # use_sliding_window defaults to False
    s = spec(**qwen, use_sliding_window=True)
    assert [l.attention.kind for l in s.layers] == ["global", "sliding", "sliding"]
    assert s.layers[1].attention.window == 16 and s.sliding_window == 16
    assert spec(**{**qwen, "max_window_layers": 3}, use_sliding_window=True).sliding_window is None
    s = spec(**qwen, layer_types=["sliding_attention", "full_attention", "full_attention"])
    assert [l.attention.kind for l in s.layers] == ["sliding", "global", "global"]
    with pytest.raises(ModelError, match="layer_types"):
        spec(**qwen, layer_types=["full_attention"])


def test_layer_spec_validates_and_properties_refuse_when_layers_differ():
    with pytest.raises(ModelError, match="window"):
        AttentionSpec(RopeSpec(1e4), kind="sliding")
    a, b = (LayerSpec(AttentionSpec(RopeSpec(t)), MlpSpec(128)) for t in (1e4, 1e6))
    s = ModelSpec("LlamaForCausalLM", 1000, 64, 8, 2, 8, 4096, NormSpec(1e-6), (a, b), True, None, ())
    assert s.num_layers == 2 and s.intermediate_size == 128
    with pytest.raises(ModelError, match="rope_theta"):
        s.rope_theta
    assert s.features() == {"per-layer rope"}


def test_architecture_from_model_type_when_architectures_missing():
    for model_type, arch in (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                             ("qwen2", "Qwen2ForCausalLM")):
        cfg = {**LLAMA, "model_type": model_type}
        del cfg["architectures"]
        assert ModelSpec.from_hf_config(cfg).architecture == arch


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "FalconForCausalLM"])
def test_unknown_architecture_named_with_supported_list(arch):
    with pytest.raises(ModelError) as e:
        spec(architectures=[arch])
    msg = str(e.value)
    assert arch in msg and "\n" not in msg
    for supported in SUPPORTED_ARCHITECTURES:
        assert supported in msg


def test_no_architecture_at_all():
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        ModelSpec.from_hf_config({"model_type": "gpt2", "vocab_size": 10})


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-tied", "mistral", "qwen2"])
def test_configs_written_by_transformers(variant, tmp_path):
    """transformers 5 writes `rope_parameters` (theta and scaling together); every field must come through."""
    from tests.tiny import VARIANTS, build_tiny_model

    model = build_tiny_model(variant)
    model.config.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    s = ModelSpec.from_hf_config(cfg)
    hf = model.config
    assert s.architecture == type(model).__name__
    assert (s.vocab_size, s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads) == \
        (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
    assert s.head_dim == model.model.layers[0].self_attn.head_dim
    assert s.rope_theta == hf.rope_parameters["rope_theta"]
    assert s.tie_word_embeddings == VARIANTS[variant][1]["tie_word_embeddings"]
    types = getattr(hf, "layer_types", None) or ["sliding_attention" if getattr(hf, "sliding_window", None)
                                                   else "full_attention"] * hf.num_hidden_layers
    for ours, theirs, kind in zip(s.layers, model.model.layers, types, strict=True):
        biases = (theirs.self_attn.q_proj.bias, theirs.self_attn.o_proj.bias, theirs.mlp.up_proj.bias)
        assert (ours.attention.qkv_bias, ours.attention.o_bias, ours.mlp.bias) == tuple(b is not None for b in biases)
        assert ours.mlp.intermediate_size == hf.intermediate_size
        assert ours.attention.window == (hf.sliding_window if kind == "sliding_attention" else None)
    if variant == "llama-gqa":
        assert s.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
        assert s.head_dim == 24 != s.hidden_size // s.num_heads
    else:
        assert s.rope_scaling is None


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 1e6},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 5000.0}])
def test_rope_spec_frequencies_match_transformers(rope_parameters):
    """The RopeSpec a config gives, through kernels/rope.inv_frequencies (what both backends use), against
    transformers' own RoPE init for the same config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from kiln.kernels.rope import inv_frequencies

    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                     rope_parameters=dict(rope_parameters))
    init = ROPE_INIT_FUNCTIONS.get(rope_parameters["rope_type"], LlamaRotaryEmbedding.compute_default_rope_parameters)
    want = init(hf)[0].numpy()
    rope = spec(head_dim=16, rope_theta=None, rope_parameters=rope_parameters).layers[0].attention.rope
    got = inv_frequencies(16, rope.theta, rope.scaling)
    assert got.shape == (8,) and float(abs(got - want).max() / want.max()) < 1e-6

