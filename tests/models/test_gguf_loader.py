"""GGUF loading: the default model against transformers' own GGUF loader, synthetic files, broken files."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from kiln.models.gguf_loader import load_gguf, permute_qk, unpermute_qk
from kiln.models.safetensors_loader import load_hf_folder
from kiln.models.spec import ModelError, ModelSpec


def write_dims(w, ref, ffn: int | None = None) -> None:
    """The GGUF metadata every tiny model's file carries: dimensions, norm epsilon, vocabulary and BOS/EOS of
    spec `ref` (`ffn`: the feed-forward length, when not ref's)."""
    w.add_block_count(ref.num_layers)
    w.add_context_length(ref.max_position_embeddings)
    w.add_embedding_length(ref.hidden_size)
    w.add_feed_forward_length(ref.intermediate_size if ffn is None else ffn)
    w.add_head_count(ref.num_heads)
    w.add_head_count_kv(ref.num_kv_heads)
    w.add_layer_norm_rms_eps(ref.norm.eps)
    w.add_vocab_size(ref.vocab_size)
    w.add_bos_token_id(ref.bos_token_id)
    w.add_eos_token_id(ref.eos_token_ids[0])


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Verbatim copy of `LlamaModel.permute` from llama.cpp's convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


@pytest.mark.slow
def test_default_gguf_matches_transformers(default_gguf, default_hf_dir):
    # default_hf_dir is transformers' own dequantisation of the same GGUF (AutoModelForCausalLM, gguf_file=...).
    cfg, ours = load_gguf(default_gguf)
    hf_cfg, ref = load_hf_folder(default_hf_dir)
    assert set(ours) == set(ref)
    for name, w in ours.items():
        assert w.dtype == np.float32 and w.shape == ref[name].shape, name
        assert np.max(np.abs(w - ref[name])) < 1e-6, name
    assert ModelSpec.from_hf_config(cfg) == ModelSpec.from_hf_config(hf_cfg)
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ours
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_permute_roundtrip():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 4), 4), w)
    assert np.array_equal(permute_qk(w, 4), llama_cpp_permute(w, 4))
    assert not np.array_equal(llama_cpp_permute(w, 4), w)


def _write_synthetic(path, arch: str, *, tied: bool, bias: bool, permute: bool):
    """A tiny 2-layer model as an HF state dict, written to GGUF the way llama.cpp's converter would."""
    rng = np.random.default_rng(0)
    V, H, I, L, nh, nkv = 40, 64, 96, 2, 4, 2
    hd = H // nh
    hf = {"model.embed_tokens.weight": rng.standard_normal((V, H)), "model.norm.weight": rng.standard_normal(H)}
    if not tied:
        hf["lm_head.weight"] = rng.standard_normal((V, H))
    for i in range(L):
        p = f"model.layers.{i}."
        hf |= {p + "self_attn.q_proj.weight": rng.standard_normal((nh * hd, H)),
               p + "self_attn.k_proj.weight": rng.standard_normal((nkv * hd, H)),
               p + "self_attn.v_proj.weight": rng.standard_normal((nkv * hd, H)),
               p + "self_attn.o_proj.weight": rng.standard_normal((H, nh * hd)),
               p + "mlp.gate_proj.weight": rng.standard_normal((I, H)),
               p + "mlp.up_proj.weight": rng.standard_normal((I, H)),
               p + "mlp.down_proj.weight": rng.standard_normal((H, I)),
               p + "input_layernorm.weight": rng.standard_normal(H),
               p + "post_attention_layernorm.weight": rng.standard_normal(H)}
        if bias:
            hf |= {p + f"self_attn.{x}_proj.bias": rng.standard_normal(n * hd) for x, n in
                   (("q", nh), ("k", nkv), ("v", nkv))}
    hf = {k: v.astype(np.float32) for k, v in hf.items()}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(5e5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_bos_token_id(3)
    w.add_eos_token_id(4)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "q_proj": "attn_q", "k_proj": "attn_k",
             "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    expected = {}
    for k, v in hf.items():
        parts = k.split(".")
        if k == "lm_head.weight":
            g = "output.weight"
        elif parts[1] == "layers":
            g = f"blk.{parts[2]}.{names[parts[-2]]}.{parts[-1]}"
        else:
            g = f"{names[parts[1]]}.weight"
        data = v
        if permute and ".attn_q." in g:
            data = llama_cpp_permute(v, nh, nh)
        elif permute and ".attn_k." in g:
            data = llama_cpp_permute(v, nh, nkv)
        if g == "blk.1.ffn_up.weight":  # one quantised tensor: expect its Q8_0 round trip
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[k] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(v.shape)
            assert np.max(np.abs(expected[k] - v)) < 0.05
        else:
            w.add_tensor(g, data)
            expected[k] = v
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("arch,tied,bias,permute", [("llama", True, False, True), ("qwen2", False, True, False)])
def test_synthetic_gguf(tmp_path, arch, tied, bias, permute):
    path = tmp_path / "tiny.gguf"
    expected = _write_synthetic(path, arch, tied=tied, bias=bias, permute=permute)
    cfg, tensors = load_gguf(path)
    assert set(tensors) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(tensors[k], v, atol=1e-6, err_msg=k)
    spec = ModelSpec.from_hf_config(cfg)
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers) == (40, 64, 96, 2)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 16)
    assert spec.rope_theta == 5e5 and spec.max_position_embeddings == 256
    assert spec.tie_word_embeddings is tied and spec.layers[0].attention.qkv_bias is bias
    assert spec.bos_token_id == 3 and spec.eos_token_ids == (4,)
    assert spec.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")


def test_garbage_file(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ModelError, match="not a readable GGUF"):
        load_gguf(p)


def test_truncated_file(tmp_path):
    src = tmp_path / "tiny.gguf"
    _write_synthetic(src, "llama", tied=True, bias=False, permute=True)
    p = tmp_path / "cut.gguf"
    p.write_bytes(src.read_bytes()[:300])
    with pytest.raises(ModelError):
        load_gguf(p)


def test_unknown_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="unsupported GGUF architecture 'gpt2'.*llama.*qwen2"):
        load_gguf(p)


def test_hf_folder_sharded_bf16(tmp_path):
    # The HF-folder loader is the reference side above; here its sharding and bf16 paths.
    import json

    import torch
    from safetensors.torch import save_file

    a = torch.randn(3, 4, dtype=torch.bfloat16)
    b = torch.randn(5, dtype=torch.float16)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelError, match="config.json"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    cfg, t = load_hf_folder(tmp_path)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and set(t) == {"a", "b"}
    assert t["a"].dtype == np.float32 and np.array_equal(t["a"], a.float().numpy())
    assert np.array_equal(t["b"], b.float().numpy())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="missing shards"):
        load_hf_folder(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        load_hf_folder(tmp_path / "nope")


@pytest.mark.parametrize("variant,arch", [("qwen3", "QWEN3"), ("phi3", "PHI3"), ("gemma3", "GEMMA3")])
def test_tiny_hf_model_written_with_llama_cpps_names_loads_back(tmp_path, variant, arch):
    """A tiny transformers checkpoint written to GGUF under the names gguf-py's tensor map gives (llama.cpp's
    own table; Gemma's norms stored as 1 + w as its converter does) loads back to the same tensors and spec."""
    from gguf.constants import MODEL_ARCH

    from tests.tiny import save_tiny_model
    folder = save_tiny_model(tmp_path / "hf", variant)
    hf_cfg, hf = load_hf_folder(folder)
    ref = ModelSpec.from_hf_config(hf_cfg)
    names = gguf.get_tensor_name_map(getattr(MODEL_ARCH, arch), ref.num_layers)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch.lower())
    write_dims(w, ref)
    rope = ref.layers[-1].attention.rope
    w.add_rope_freq_base(rope.theta)
    if arch == "PHI3":
        w.add_rope_dimension_count(rope.rotary_dim)
        w.add_sliding_window(ref.sliding_window)
    elif arch == "GEMMA3":
        w.add_key_length(ref.head_dim)
        w.add_sliding_window(ref.sliding_window)
    else:
        w.add_key_length(ref.head_dim)
    for k, v in hf.items():
        base, suffix = k.rsplit(".", 1)
        data = np.asarray(v) + (1.0 if arch == "GEMMA3" and k.endswith("norm.weight") else 0.0)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg, tensors = load_gguf(tmp_path / "m.gguf")
    assert set(tensors) == set(hf)
    for k, v in hf.items():
        np.testing.assert_allclose(tensors[k], v, atol=1e-6, err_msg=k)
    spec = ModelSpec.from_hf_config(cfg)
    if arch == "GEMMA3":   # llama.cpp stores neither query_pre_attn_scalar nor per-kind RoPE: its fixed values
        assert spec.layers[0].attention.scale == ref.head_dim ** -0.5
        assert [l.attention.rope.theta for l in spec.layers] == [1e4, 1e4]
        assert [l.attention.window for l in spec.layers] == [12, 12]     # 2 layers: both local (every 6th global)
    else:                  # GGUF keeps the epsilon as float32
        import dataclasses
        assert abs(spec.norm.eps - ref.norm.eps) < 1e-9 and dataclasses.replace(spec, norm=ref.norm) == ref
