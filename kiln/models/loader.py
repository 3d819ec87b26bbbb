"""One entry point from a `--model` value to (spec, HF-named tensors, tokenizer)."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from kiln.models.fetch import resolve_model
from kiln.models.gguf_loader import load_gguf
from kiln.models.safetensors_loader import load_hf_folder
from kiln.models.spec import ModelSpec
from kiln.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    path: Path
    spec: ModelSpec
    tensors: dict[str, np.ndarray]    # HF names, float32, HF layout
    tokenizer: Tokenizer


def load_model(name_or_path: str, models_dir: Path) -> LoadedModel:
    t0 = time.perf_counter()
    path = resolve_model(name_or_path, models_dir)
    if path.is_dir():
        cfg, tensors = load_hf_folder(path)
        tok = Tokenizer.from_hf_folder(path)
    else:
        cfg, tensors = load_gguf(path)
        tok = Tokenizer.from_gguf(path)
    spec = ModelSpec.from_hf_config(cfg)
    if not spec.eos_token_ids and tok.eos_token_id is not None:
        spec = dataclasses.replace(spec, eos_token_ids=(tok.eos_token_id,))
    log.info("loaded %s (%s, %d layers) in %.1fs", path, spec.architecture, spec.num_layers,
             time.perf_counter() - t0)
    return LoadedModel(path, spec, tensors, tok)
