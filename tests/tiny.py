"""Tiny random-weight HF checkpoints (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3), written by transformers itself, for tests.

`save_tiny_model(path, "llama-gqa")` writes `config.json`, `model.safetensors` (float32) and a byte-level
tokenizer (256 byte tokens + `<s>`, `</s>`, so `vocab_size == len(tokenizer)`) into `path` and returns it.
Every parameter is drawn from a seeded generator, biases and norm weights included (HF initialises those to
0 and 1, which would hide a dropped bias or norm), with a spread large enough that greedy argmaxes are not
near-ties. The model is built and saved by transformers, so its files are what a real checkpoint looks like.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 258   # 256 byte-level tokens + <s> + </s>
BOS, EOS = 256, 257

# name -> (architecture, config kwargs). Common dims: hidden 64, 2 layers, 4 heads.
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # GQA 4:2, Llama-3 rope scaling (original context 16 so positions past it are scaled), untied head,
    # head_dim 24 != 64/4, bias on q/k/v/o.
    "llama-gqa": ("llama", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                                attention_bias=True, rope_theta=5000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # plain multi-head attention, tied embeddings
    "llama-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    # Mistral with GQA 4:1 and a sliding window of 12 (not a multiple of the 16-token block): prompts of 33
    # and 50 tokens and decodes past 12 see only their window
    "mistral": ("mistral", dict(num_key_value_heads=1, tie_word_embeddings=False, sliding_window=12,
                                rope_theta=1e6)),
    # Qwen2: q/k/v bias (no o bias), tied; use_sliding_window from layer 1 on (window 20): one global layer,
    # one sliding
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
                            use_sliding_window=True, sliding_window=20, max_window_layers=1)),
    # Qwen3: q/k norms, untied, head_dim 24
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, rope_theta=1e6)),
    # Gemma 3: a local layer (window 12, RoPE base 1e4) then a global one (base 1e6, linear scaling 4),
    # sandwich and q/k norms, query_pre_attn_scalar 20 != head_dim 16, tied, GELU-tanh
    "gemma3": ("gemma3", dict(head_dim=16, tie_word_embeddings=True, sliding_window=12, query_pre_attn_scalar=20,
                              layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6,
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                               "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                  "rope_theta": 1e6}})),
    # Gemma 2: attention and final logit soft-capping (small caps, so they bite), local + global, GQA 4:1
    "gemma2": ("gemma2", dict(head_dim=16, num_key_value_heads=1, tie_word_embeddings=True, sliding_window=12,
                              query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=5.0,
                              final_logit_softcapping=15.0, rms_norm_eps=1e-6)),
    # Mixtral: 4 experts, top-2 (renormalised), sliding window 12
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                                sliding_window=12, rope_theta=1e6)),
    # Qwen2-MoE: 4 experts of width 32, top-2 not renormalised, a gated shared expert of width 48, q/k/v bias
    "qwen2-moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, norm_topk_prob=False,
                                    tie_word_embeddings=False)),
    # Qwen3-MoE: q/k norms, 4 experts top-2 renormalised
    "qwen3-moe": ("qwen3_moe", dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=True, head_dim=24, tie_word_embeddings=False)),
    # Phi-3: fused qkv / gate_up, partial rotary 0.5 of head_dim 16, sliding window 12
    "phi3": ("phi3", dict(tie_word_embeddings=False, sliding_window=12, pad_token_id=0,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})),
}


def _classes(arch: str):
    import transformers as T
    return {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "mistral": (T.MistralConfig, T.MistralForCausalLM),
            "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM), "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
            "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM), "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM),
            "mixtral": (T.MixtralConfig, T.MixtralForCausalLM), "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM),
            "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM), "phi3": (T.Phi3Config, T.Phi3ForCausalLM)}[arch]


def build_tiny_model(arch: str, seed: int = 0, **overrides):
    """An in-memory random-weight transformers model. `arch` is a VARIANTS name or a family key of _classes."""
    import torch

    family, kwargs = VARIANTS.get(arch, (arch, {}))
    cfg_cls, model_cls = _classes(family)
    cfg = cfg_cls(**{**_BASE, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                # tied: a small embedding, else the head mostly sees the input token and repeats it
                p.normal_(0.0, 0.1 if cfg.tie_word_embeddings else 1.0)
            elif name.endswith("lm_head.weight"):
                p.normal_(0.0, 1.0)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # layer outputs well above the embedding in the residual (see above)
                p.normal_(0.0, 3.0 * p.shape[-1] ** -0.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)   # unit-variance outputs from unit-variance inputs
    return model


def save_tokenizer(path: str | Path) -> None:
    """A byte-level BPE tokenizer (no merges) with <s>/</s>, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    assert len(byte_chars) == 256
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    assert fast.convert_tokens_to_ids(["<s>", "</s>"]) == [BOS, EOS] and len(fast) == VOCAB
    fast.save_pretrained(str(path))


def save_tiny_model(path: str | Path, arch: str = "llama-gqa", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model (config.json + float32 model.safetensors + tokenizer) to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(arch, seed, **overrides)
    model.save_pretrained(str(path), safe_serialization=True)
    save_tokenizer(path)
    return path


def load_hf(path: str | Path):
    """The saved model back through transformers, float32, eval mode: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
