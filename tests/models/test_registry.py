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


MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=24)


def test_every_architecture_has_a_family():
    families = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma",
                "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen_moe",
                "Qwen3MoeForCausalLM": "qwen_moe", "Phi3ForCausalLM": "phi3"}
    assert registry.SUPPORTED_ARCHITECTURES == tuple(families)
    assert {a: registry.family_of(a).name for a in registry.SUPPORTED_ARCHITECTURES} == families
    for arch in registry.SUPPORTED_ARCHITECTURES:
        spec = ModelSpec.from_hf_config(cfg(arch, **MOE))
        assert spec.architecture == arch and registry.family_of(spec) is registry.family_of(arch)
        assert set(registry.layout(spec).expected_shapes())      # every family names its tensors


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
    assert registry.GGUF_ARCHITECTURES == ("llama", "qwen2", "qwen3", "gemma3", "gemma2", "llama+experts",
                                           "qwen2moe", "qwen3moe", "phi3")
    assert registry.gguf_arch("llama+experts").architecture == "MixtralForCausalLM"
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


@pytest.mark.parametrize("config, message", [
    (cfg("Phi3ForCausalLM", rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
     "Phi3ForCausalLM: rope_scaling type 'longrope' is not supported"),
    (cfg("LlamaForCausalLM", rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     "unsupported rope_scaling type 'yarn'; supported: llama3, linear"),
    (cfg("Gemma3ForCausalLM", use_bidirectional_attention=True),
     "Gemma3ForCausalLM: use_bidirectional_attention is not supported"),
    (cfg("Phi3ForCausalLM", partial_rotary_factor=0.375), "partial_rotary_factor 0.375 gives 3 of 8 rotary dims"),
])
def test_unsupported_options_are_refused_in_one_line_naming_them(config, message):
    with pytest.raises(ModelError) as e:
        ModelSpec.from_hf_config(config)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_moe_layouts_name_every_expert_and_mixed_dense_sparse_models_are_refused():
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
    spec = ModelSpec.from_hf_config(cfg("Qwen2MoeForCausalLM", **moe))
    lay = registry.layout(spec).layers[0]
    assert lay["experts_gate_up"].shape == (4 * 2 * 16, 32) and lay["experts_down"].shape == (4 * 32, 16)
    assert lay["experts_gate_up"].sources[:2] == ("model.layers.0.mlp.experts.0.gate_proj.weight",
                                                  "model.layers.0.mlp.experts.0.up_proj.weight")
    assert lay["shared_gate"].shape == (1, 32) and lay["router"].shape == (4, 32)
    mixtral = registry.layout(ModelSpec.from_hf_config(cfg("MixtralForCausalLM", num_local_experts=4,
                                                           num_experts_per_tok=2))).layers[1]
    assert mixtral["experts_down"].sources[3] == "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    mixed = ModelSpec.from_hf_config(cfg("Qwen2MoeForCausalLM", **moe, mlp_only_layers=[0]))
    with pytest.raises(ModelError, match="does not implement layers of different structure yet"):
        mixed.check_supported("jax", {"mixture of experts"})


def test_phi3_partial_rotary_permutes_q_and_k_rows_per_head():
    from kiln.models.phi3 import rotary_perm
    assert rotary_perm(8, 4) == [0, 1, 4, 5, 2, 3, 6, 7]       # rotated pairs (0,2),(1,3) -> (0,4),(1,5)
    spec = ModelSpec.from_hf_config(cfg("Phi3ForCausalLM", partial_rotary_factor=0.5))
    qkv = registry.layout(spec).layers[0]["qkv"]
    assert spec.layers[0].attention.rope.rotary_dim == 4 and qkv.perm[:8] == (0, 1, 4, 5, 2, 3, 6, 7)
    assert qkv.perm[6 * 8:] == tuple(range(6 * 8, 8 * 8))        # v rows untouched
