"""MoE GGUF files (Mixtral as llama + experts, qwen2moe, qwen3moe): a tiny transformers checkpoint written the
way llama.cpp's converter writes it (gguf-py's own tensor map, experts stacked [n_expert, rows, cols], Mixtral's
Q/K rows permuted) loads back to the HF folder's tensors and spec, and generates transformers' greedy tokens."""
from __future__ import annotations

import dataclasses
import re

import gguf
import numpy as np
import pytest
from gguf.constants import MODEL_ARCH, GGMLQuantizationType

from kiln.models.gguf_loader import load_gguf
from kiln.models.safetensors_loader import load_hf_folder
from kiln.models.spec import ModelError, ModelSpec
from tests.models.test_gguf_loader import llama_cpp_permute, write_dims
from tests.tiny import load_hf, save_tiny_model

# variant -> (gguf arch, overrides): llama.cpp's llama arch stores no sliding window, so the Mixtral has none
CASES = {"mixtral": ("LLAMA", {"sliding_window": None}), "qwen2-moe": ("QWEN2MOE", {}),
         "qwen3-moe": ("QWEN3MOE", {})}
_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def _stack_experts(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF per-expert tensors -> one [n_expert, rows, cols] tensor per layer and projection, as the converter does."""
    out, groups = {}, {}
    for k, v in hf.items():
        m = _EXPERT.match(k)
        if m:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = v
        else:
            out[k[:-len(".weight")] if k.endswith(".weight") else k] = v
    for k, by_e in groups.items():
        out[k] = np.stack([by_e[e] for e in range(len(by_e))])
    return out


def _write_tokenizer(w: gguf.GGUFWriter) -> None:
    """tests/tiny's byte-level tokenizer (256 byte tokens, no merges, <s> </s>) in GGUF's gpt2 form."""
    from tokenizers import pre_tokenizers
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<s>", "</s>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3])
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])


def write_moe_gguf(path, folder, arch: str, *, f16: bool = False, **extra_meta) -> dict[str, np.ndarray]:
    """The HF folder as a GGUF named by gguf-py's tensor map; returns the HF tensors the file holds (with the F16
    round trip where `f16`: every ffn_down_exps tensor is stored F16)."""
    hf_cfg, hf = load_hf_folder(folder)
    ref = ModelSpec.from_hf_config(hf_cfg)
    moe = ref.layers[0].mlp
    names = gguf.get_tensor_name_map(getattr(MODEL_ARCH, arch), ref.num_layers)
    w = gguf.GGUFWriter(str(path), arch.lower())
    write_dims(w, ref, ffn=int(hf_cfg["intermediate_size"]))
    w.add_key_length(ref.head_dim)
    w.add_rope_freq_base(ref.layers[0].attention.rope.theta)
    w.add_expert_count(moe.num_experts)
    w.add_expert_used_count(moe.top_k)
    if arch != "LLAMA":
        w.add_expert_feed_forward_length(moe.intermediate_size)
    if moe.shared_expert_size:
        w.add_expert_shared_feed_forward_length(moe.shared_expert_size)
    for key, value in extra_meta.items():
        getattr(w, f"add_{key}")(value)
    _write_tokenizer(w)
    expected = dict(hf)
    for base, v in _stack_experts(hf).items():
        suffix = "bias" if base.endswith(".bias") else "weight"
        g = names.get_name(base.removesuffix(".bias"))
        assert g is not None, base
        v = np.ascontiguousarray(v, np.float32)
        if arch == "LLAMA" and g.endswith((".attn_q", ".attn_k")):
            v = llama_cpp_permute(v, ref.num_heads, ref.num_kv_heads if g.endswith("_k") else None)
        if g.endswith("ffn_gate_inp_shexp"):
            v = v.reshape(-1)      # llama.cpp's shared-expert gate is [n_embd] (HF: [1, n_embd])
        if f16 and g.endswith("ffn_down_exps"):
            v = v.astype(np.float16)
            for e in range(v.shape[0]):
                expected[f"{base.rsplit('.', 1)[0]}.{e}.{base.rsplit('.', 1)[1]}.weight"] = v[e].astype(np.float32)
        w.add_tensor(f"{g}.{suffix}", v, raw_dtype=GGMLQuantizationType.F16 if v.dtype == np.float16 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("variant", sorted(CASES))
def test_moe_gguf_loads_the_hf_folders_tensors_and_spec(tmp_path, variant):
    arch, overrides = CASES[variant]
    folder = save_tiny_model(tmp_path / "hf", variant, **overrides)
    expected = write_moe_gguf(tmp_path / "m.gguf", folder, arch, f16=True)
    hf_cfg, hf = load_hf_folder(folder)
    cfg, tensors = load_gguf(tmp_path / "m.gguf")
    assert set(tensors) == set(hf)
    for k, v in expected.items():
        assert tensors[k].shape == hf[k].shape, k
        np.testing.assert_allclose(tensors[k], v, atol=1e-6, err_msg=k)
    assert any(not np.array_equal(expected[k], hf[k]) for k in expected)   # the F16 tensors did round
    spec, ref = ModelSpec.from_hf_config(cfg), ModelSpec.from_hf_config(hf_cfg)
    assert abs(spec.norm.eps - ref.norm.eps) < 1e-9 and dataclasses.replace(spec, norm=ref.norm) == ref


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe"])
def test_moe_gguf_greedy_matches_transformers(tmp_path, variant):
    from kiln import LLM, SamplingParams
    from tests.backends.test_model_vs_hf import hf_greedy, prompt

    arch, overrides = CASES[variant]
    folder = save_tiny_model(tmp_path / "hf", variant, **overrides)
    write_moe_gguf(tmp_path / "m.gguf", folder, arch)
    llm = LLM(model=str(tmp_path / "m.gguf"), backend="jax", dtype="float32", max_model_len=64,
              kv_cache_gib=0.01, max_num_seqs=2, warmup=False, allow_lazy_compile=True)
    prompts = [prompt(n, 258, seed=7) for n in (5, 19)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    hf = load_hf(folder)
    for p, o in zip(prompts, outs):
        want = hf_greedy(hf, p, 8)
        assert len(set(want)) > 2, want
        assert o.outputs[0].token_ids == want, f"{variant}: kiln {o.outputs[0].token_ids} != transformers {want}"


@pytest.mark.parametrize("meta,named", [
    ({"expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID}, "expert_gating_func"),
    ({"expert_weights_scale": 2.5}, "expert_weights_scale"),
    ({"leading_dense_block_count": 1}, "leading_dense_block_count")])
def test_moe_options_kiln_lacks_are_refused_by_name(tmp_path, meta, named):
    folder = save_tiny_model(tmp_path / "hf", "qwen2-moe")
    write_moe_gguf(tmp_path / "m.gguf", folder, "QWEN2MOE", **meta)
    with pytest.raises(ModelError, match=f"unsupported MoE option {named}=") as e:
        load_gguf(tmp_path / "m.gguf")
    assert "\n" not in str(e.value)


def test_unknown_moe_architecture_is_refused_by_name(tmp_path):
    folder = save_tiny_model(tmp_path / "hf", "qwen3-moe")
    write_moe_gguf(tmp_path / "m.gguf", folder, "QWEN3MOE")
    data = (tmp_path / "m.gguf").read_bytes()   # same-length rename of general.architecture's value
    (tmp_path / "x.gguf").write_bytes(data.replace(b"qwen3moe", b"olmoemoe"))
    with pytest.raises(ModelError, match="unsupported GGUF architecture 'olmoemoe'"):
        load_gguf(tmp_path / "x.gguf")
