"""Architecture names -> the family that defines them: the one table of which models kiln runs.

    spec_from_config(cfg)     config.json -> ModelSpec (cfg["architectures"][0], else cfg["model_type"])
    family_of(spec)           the Family of a spec's architecture
    layout(spec)              kiln tensor names -> checkpoint tensors (models/layout.py)
    gguf_arch(name)           a GGUF `general.architecture` -> how its files load (models/family.GgufArch)
    SUPPORTED_ARCHITECTURES   every HF architecture name, in FAMILIES order

How to add an architecture (say Qwen3):
  1. Write kiln/models/qwen3.py: `spec_from_config(arch, cfg)` turns its config.json into a ModelSpec (model-wide
     fields from `hf_config.model_fields`, one LayerSpec per layer: `AttentionSpec(qk_norm=True, ...)`), a
     `layout(spec)` naming its tensors in kiln's layout (reuse `naming.llama_layout` and add q_norm/k_norm), and
     `FAMILY = Family(...)` with its HF architecture names and, if llama.cpp writes it, its `GgufArch`.
  2. Add "qwen3" to FAMILIES below.
  3. Test it against transformers: a tiny random variant in tests/tiny.py makes tests/backends/test_model_vs_hf.py
     and test_torch_backend.py compare every backend with transformers' logits and greedy tokens; add its
     config cases to tests/models/test_registry.py. A feature no backend implements yet (`ModelSpec.features()`)
     is refused by `check_supported` with its name, until that backend's decoder layer learns it.
"""
from __future__ import annotations

import importlib
from typing import Any

from kiln.models.family import Family, GgufArch
from kiln.models.layout import Layout
from kiln.models.spec import ModelError, ModelSpec

FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "mixtral", "qwen_moe", "phi3")   # module names under kiln/models/, one per family

_families: tuple[Family, ...] = tuple(importlib.import_module(f"kiln.models.{m}").FAMILY for m in FAMILIES)
_by_arch = {arch: f for f in _families for arch in f.architectures}
_by_model_type = {mt: arch for f in _families for arch, mt in f.architectures.items()}
_by_gguf = {g.name: g for f in _families for g in f.gguf}

SUPPORTED_ARCHITECTURES = tuple(_by_arch)
GGUF_ARCHITECTURES = tuple(_by_gguf)


def architecture_of(cfg: dict[str, Any]) -> str:
    """The HF architecture a config names (`architectures[0]`, else by `model_type`), or ModelError."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else _by_model_type.get(cfg.get("model_type", ""), "")
    if arch not in _by_arch:
        raise ModelError(f"unsupported architecture {arch or cfg.get('model_type')!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def family_of(spec_or_arch: ModelSpec | str) -> Family:
    arch = spec_or_arch if isinstance(spec_or_arch, str) else spec_or_arch.architecture
    if arch not in _by_arch:
        raise ModelError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return _by_arch[arch]


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    arch = architecture_of(cfg)
    return _by_arch[arch].spec_from_config(arch, cfg)


def layout(spec: ModelSpec) -> Layout:
    return family_of(spec).layout(spec)


def gguf_arch(name: str | None) -> GgufArch:
    if name not in _by_gguf:
        raise ModelError(f"unsupported GGUF architecture {name!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    return _by_gguf[name]
