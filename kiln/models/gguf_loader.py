"""Load a GGUF file (llama.cpp's format) as an HF-style config dict plus HF-named float32 numpy tensors.

The flow: `gguf.GGUFReader` memory-maps the file; metadata under `{arch}.*` and `tokenizer.ggml.*` becomes a
`config.json`-shaped dict; each tensor is dequantised on its own (`gguf.quants.dequantize`), renamed from
llama.cpp's names (`blk.3.attn_q.weight`) to HF's (`model.layers.3.self_attn.q_proj.weight`) by the tables of
the family that `general.architecture` names (models/registry.py), and where that family says so (llama) the
Q/K rows get the inverse of the interleaving permutation `convert_hf_to_gguf.py` applies. MoE files: a file
with `{arch}.expert_count` loads by the "{arch}+experts" entry where one is registered (Mixtral is "llama" with
experts), each stacked expert tensor [n_expert, rows, cols] becomes one HF tensor per expert, and routing
options kiln does not implement (sigmoid gating, expert weight scales, groups, leading dense layers) are refused.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from kiln.models import registry
from kiln.models.family import GgufArch
from kiln.models.spec import ModelError

log = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str | Path):
    """GGUFReader over `path`, with every failure turned into a one-line ModelError."""
    path = Path(path)
    import gguf

    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on a bad file
        raise ModelError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None


def read_metadata(reader) -> dict[str, Any]:
    """All scalar/string/array metadata fields as Python values, skipping the big tokenizer arrays."""
    big = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    meta = {}
    for key, field in reader.fields.items():
        if key in big:
            meta[key + ".count"] = len(field.data)
        elif not key.startswith("GGUF."):
            meta[key] = field.contents()
    return meta


def hf_name(gguf_name: str, arch: GgufArch) -> str:
    """llama.cpp tensor name -> HF name, by the family's tables; ModelError for a tensor kiln has no place for."""
    if gguf_name in arch.global_names:
        return arch.global_names[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in arch.block_names:
        return f"model.layers.{m.group(1)}.{arch.block_names[m.group(2)]}.{m.group(3)}"
    raise ModelError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)`: per head, rows [0,2,4..,1,3,5..] back to HF's half-split order."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf.LlamaModel.permute` (HF rotate-half rows -> interleaved rows)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_scaling(freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover Llama-3.1 `rope_scaling` from the `rope_freqs` tensor llama.cpp stores in its place.

    llama.cpp bakes the per-frequency divisors into a tensor; we assume the Llama 3.x constants
    (low/high freq factor 1/4, original context 8192), take `factor` from the table, and check the whole
    table matches so any other scaling fails loudly rather than silently changing the model.
    """
    factor = float(freqs.max())
    rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = 8192 / 1.0, 8192 / 4.0
    smooth = np.clip((8192 / wavelen - 1.0) / (4.0 - 1.0), 0.0, 1.0)
    expect = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, 1 / ((1 - smooth) / factor + smooth)))
    if expect.shape != freqs.shape or not np.allclose(expect, freqs, rtol=1e-3):
        raise ModelError("GGUF rope_freqs tensor does not match Llama-3 rope scaling; unsupported rope scaling")
    return rs


def _gguf_arch(meta: dict[str, Any], path: Path) -> GgufArch:
    name = meta.get("general.architecture")
    if meta.get(f"{name}.expert_count") and f"{name}+experts" in registry.GGUF_ARCHITECTURES:
        name = f"{name}+experts"
    try:
        return registry.gguf_arch(name)
    except ModelError as e:
        raise ModelError(f"{path.name}: {e}") from None


# MoE options of llama.cpp's metadata and the one value of each that kiln's routed layer computes
_MOE_DEFAULTS = {"expert_gating_func": 1, "expert_weights_scale": 1.0, "expert_group_count": 0,
                 "expert_group_used_count": 0, "leading_dense_block_count": 0, "expert_shared_count": 1}


def _check_moe(get, path: Path, norm_topk: bool) -> None:
    """One-line ModelError naming a MoE option kiln does not implement (softmax routing over every expert)."""
    for key, ok in _MOE_DEFAULTS.items():
        v = get(key)
        if v is not None and v != ok and not (key.startswith("expert_group") and v == 1):
            what = " (1 = softmax, 2 = sigmoid)" if key == "expert_gating_func" else ""
            raise ModelError(f"{path.name}: unsupported MoE option {key}={v!r}{what}; kiln implements {ok!r}")
    if get("expert_used_count") is None:
        raise ModelError(f"{path.name}: GGUF metadata has expert_count but no expert_used_count")
    if get("expert_weights_norm") is not None and bool(get("expert_weights_norm")) != norm_topk:
        raise ModelError(f"{path.name}: unsupported MoE option expert_weights_norm={get('expert_weights_norm')!r} "
                         f"for this architecture")


def _config(meta: dict[str, Any], reader, path: Path) -> dict[str, Any]:
    """HF `config.json` dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    family = _gguf_arch(meta, path)

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    moe = get("expert_count") is not None
    if moe and get("feed_forward_length") is None:     # an all-MoE model need not write the dense width
        meta[f"{arch}.feed_forward_length"] = get("expert_feed_forward_length")
    missing = [k for k in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
               if get(k) is None]
    if missing:
        raise ModelError(f"{path.name}: GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in missing)}")
    by_name = {t.name: t for t in reader.tensors}
    names = set(by_name)
    if "token_embd.weight" not in by_name:
        raise ModelError(f"{path.name}: GGUF file has no token_embd.weight tensor")
    heads = int(get("attention.head_count"))
    cfg: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": int(get("vocab_size") or meta.get("tokenizer.ggml.tokens.count") or by_name["token_embd.weight"].shape[1]),
        "hidden_size": int(get("embedding_length")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    head_dim = get("attention.key_length") or get("rope.dimension_count")   # rotary over the whole head
    if head_dim:
        cfg["head_dim"] = int(head_dim)
    for key, gguf_key in (("bos", "bos"), ("pad", "padding")):
        if meta.get(f"tokenizer.ggml.{gguf_key}_token_id") is not None:
            cfg[f"{key}_token_id"] = int(meta[f"tokenizer.ggml.{gguf_key}_token_id"])
    eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    eos = list(dict.fromkeys(eos))
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    kind = get("rope.scaling.type")
    if kind and kind != "none":
        cfg["rope_scaling"] = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length"):
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    elif "rope_freqs.weight" in names:
        freqs = _dequantize(by_name["rope_freqs.weight"])
        cfg["rope_scaling"] = _llama3_rope_scaling(freqs, cfg["rope_theta"],
                                                   cfg.get("head_dim", cfg["hidden_size"] // heads))
    if family.config is not None:
        try:
            cfg.update(family.config(get, cfg))
        except TypeError:   # int(None): a field the family needs is not there
            raise ModelError(f"{path.name}: GGUF metadata lacks a field {family.architecture} needs") from None
    if moe:
        _check_moe(get, path, bool(cfg.get("norm_topk_prob", True)))
    return cfg


def _dequantize(t) -> np.ndarray:
    """One GGUF tensor as float32 in numpy (HF) axis order; ggml lists dims fastest-first."""
    from gguf.quants import dequantize

    try:
        w = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ModelError(f"GGUF tensor {t.name}: {e}") from None
    return np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def split_experts(w: np.ndarray, name: str, cfg: dict[str, Any], gguf_name: str) -> dict[str, np.ndarray]:
    """A stacked expert tensor [n_expert, rows, cols] -> {HF name of expert e: w[e]}."""
    n = cfg.get("num_local_experts") or cfg.get("num_experts")
    if w.ndim != 3 or w.shape[0] != n:
        raise ModelError(f"GGUF tensor {gguf_name} has shape {w.shape}; expected [{n} experts, rows, cols]")
    return {name.format(e=e): np.ascontiguousarray(w[e]) for e in range(n)}


def load_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a GGUF file into (HF config dict, {HF tensor name: float32 array}), dequantising tensor by tensor."""
    path = Path(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    cfg = _config(meta, reader, path)
    family = _gguf_arch(meta, path)
    permuted = family.permute_qk
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into cfg["rope_scaling"]
        name = hf_name(t.name, family)
        w = _dequantize(t)
        if permuted and ".attn_q." in t.name:
            w = unpermute_qk(w, n_heads)
        elif permuted and ".attn_k." in t.name:
            w = unpermute_qk(w, n_kv)
        if family.norm_shift and t.name.endswith("norm.weight"):
            w = w - family.norm_shift                 # llama.cpp stored 1 + w (Gemma); HF holds w
        if name.endswith("shared_expert_gate.weight") and w.ndim == 1:
            w = w[None, :]                            # [D] -> HF's [1, D] (transformers does the same)
        if "{e}" in name:
            tensors.update(split_experts(w, name, cfg, t.name))
        else:
            tensors[name] = w
    log.info("loaded %s: %s, %d tensors (%s)", path.name, cfg["architectures"][0], len(tensors),
             ", ".join(sorted({t.tensor_type.name for t in reader.tensors})))
    return cfg, tensors
