"""The architecture registry and kiln's weight layout: lookups by HF architecture, model_type and GGUF
architecture, the one-line errors, the tensors each spec names, and backends refusing what they don't run."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.models import registry
from kiln.models.layout import Fused, SourceTensors
from kiln.models.spec import LayerSpec, ModelError, ModelSpec, MoeSpec
from kiln.models.tensors import check_tensors, expected_shapes, source_tensors

BASE = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def cfg(arch: str, **kw) -> dict:
    return {"architectures": [arch], **BASE, **kw}


def test_every_architecture_has_a_family():
    assert registry.SUPPORTED_ARCHITECTURES == ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                                "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Gemma2ForCausalLM")
    assert {a: registry.family_of(a).name for a in registry.SUPPORTED_ARCHITECTURES} == \
        {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma"}
    for arch in registry.SUPPORTED_ARCHITECTURES:
        spec = ModelSpec.from_hf_config(cfg(arch))
        assert spec.architecture == arch and registry.family_of(spec) is registry.family_of(arch)


def test_model_type_names_the_architecture_when_architectures_is_missing():
    assert registry.architecture_of({"model_type": "mistral"}) == "MistralForCausalLM"
    assert registry.architecture_of({"model_type": "qwen2", "architectures": []}) == "Qwen2ForCausalLM"


@pytest.mark.parametrize("bad", [{"architectures": ["GPT2LMHeadModel"]}, {"model_type": "gpt2"}, {}])
def test_unsupported_architecture_is_one_line_listing_the_supported(bad):
    with pytest.raises(ModelError) as e:
        registry.spec_from_config({**BASE, **bad})
    msg = str(e.value)
    assert msg.startswith("unsupported architecture") and "\n" not in msg
    assert "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in msg
    with pytest.raises(ModelError, match="unsupported architecture 'FalconForCausalLM'; supported: Llama"):
        registry.family_of("FalconForCausalLM")


def test_gguf_architectures():
    assert registry.GGUF_ARCHITECTURES == ("llama", "qwen2", "qwen3", "gemma3", "gemma2")
    assert registry.gguf_arch("gemma3").norm_shift == 1.0 and registry.gguf_arch("qwen3").norm_shift == 0.0
    llama, qwen2 = registry.gguf_arch("llama"), registry.gguf_arch("qwen2")
    assert (llama.architecture, llama.permute_qk) == ("LlamaForCausalLM", True)
    assert (qwen2.architecture, qwen2.permute_qk) == ("Qwen2ForCausalLM", False)
    assert llama.block_names["attn_q"] == "self_attn.q_proj" and llama.global_names["output.weight"] == "lm_head.weight"
    with pytest.raises(ModelError, match="unsupported GGUF architecture 'falcon'; supported: llama, qwen2, qwen3"):
        registry.gguf_arch("falcon")


def test_layout_fuses_qkv_and_gate_up_and_names_biases_from_the_layer_spec():
    spec = ModelSpec.from_hf_config(cfg("Qwen2ForCausalLM", tie_word_embeddings=True))
    lay = registry.layout(spec)
    assert set(lay.globals) == {"embed", "final_norm"}                      # tied: no head
    assert set(lay.layers[1]) == {"attn_norm", "qkv", "qkv_bias", "o", "mlp_norm", "gate_up", "down"}
    qkv = lay.layers[1]["qkv"]
    assert qkv.sources == tuple(f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv")
    assert qkv.shape == ((4 + 2 * 2) * 8, 32) and lay.layers[0]["gate_up"].shape == (96, 32)
    llama = registry.layout(ModelSpec.from_hf_config(cfg("LlamaForCausalLM", attention_bias=True, mlp_bias=True)))
    assert {"head", "embed", "final_norm"} == set(llama.globals)
    assert {"qkv_bias", "o_bias", "gate_up_bias", "down_bias"} <= set(llama.layers[0])
    assert llama.layers[0]["o_bias"] == Fused(("model.layers.0.self_attn.o_proj.bias",), ((32,),))


def test_source_tensors_fuse_on_demand_and_check_every_tensor():
    spec = ModelSpec.from_hf_config(cfg("LlamaForCausalLM", head_dim=12))
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in expected_shapes(spec).items()}
    src = source_tensors(spec, tensors)
    p = "model.layers.1.mlp."
    assert np.array_equal(src.layer(1, "gate_up"), np.concatenate([tensors[p + "gate_proj.weight"],
                                                                   tensors[p + "up_proj.weight"]]))
    assert src.layer(0, "qkv").shape == (8 * 12, 32) and src.layer(0, "o").shape == (32, 4 * 12)
    assert "head" in src and src.has_layer("qkv") and not src.has_layer("qkv_bias")
    check_tensors(spec, tensors)
    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ModelError, match=r"missing tensor model.layers.1.self_attn.k_proj.weight \(expected shape "
                                         r"\[24, 32\]\)"):
        SourceTensors(registry.layout(spec), missing)
    with pytest.raises(ModelError, match=r"tensor lm_head.weight has shape \[100, 31\], expected \[100, 32\]"):
        check_tensors(spec, {**tensors, "lm_head.weight": np.zeros((100, 31), np.float32)})


def test_backends_refuse_features_they_do_not_implement_by_name():
    import dataclasses
    spec = ModelSpec.from_hf_config(cfg("LlamaForCausalLM"))
    spec.check_supported("jax")
    moe = LayerSpec(spec.layers[0].attention, MoeSpec(num_experts=8, top_k=2, intermediate_size=48))
    qk_norm = dataclasses.replace(spec.layers[0].attention, qk_norm=True)
    odd = dataclasses.replace(spec, layers=(moe, LayerSpec(qk_norm, spec.layers[0].mlp, norms="sandwich")),
                              final_logit_softcap=30.0)
    with pytest.raises(ModelError) as e:
        odd.check_supported("torch")
    assert str(e.value) == ("LlamaForCausalLM: the torch backend does not implement final logit softcap, "
                            "layers of different structure, mixture of experts, qk_norm, sandwich-norm layers yet")
    odd.check_supported("future", odd.features())
