"""One entry point from a `--model` value to (spec, HF-named tensors, tokenizer).

A GGUF file is dequantised once: the result is kept as an HF folder (config, float32 safetensors, tokenizer)
under `<models_dir>/converted/`, keyed by the file's path, size and mtime, and later loads read that folder,
which takes a fraction of the time (memory-mapped safetensors, a saved fast tokenizer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
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


CONVERT_VERSION = 1   # bump when the GGUF conversion changes what it produces


def converted_dir(gguf: Path, models_dir: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{CONVERT_VERSION}".encode()).hexdigest()
    return Path(models_dir) / "converted" / f"{gguf.stem}-{key[:12]}"


def _save_converted(dest: Path, cfg: dict, tensors: dict[str, np.ndarray], tok: Tokenizer) -> None:
    """Write the dequantised model as an HF folder, atomically (a temporary folder renamed into place)."""
    from safetensors.numpy import save_file
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        tok.hf.save_pretrained(str(tmp))
        os.replace(tmp, dest)
        log.info("kept the dequantised model in %s for faster loads", dest)
    except OSError as e:   # a full disk or a race with another process: the model is loaded either way
        log.warning("could not keep the dequantised model in %s: %s", dest, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(name_or_path: str, models_dir: Path) -> LoadedModel:
    t0 = time.perf_counter()
    path = resolve_model(name_or_path, models_dir)
    folder = path if path.is_dir() else converted_dir(path, models_dir)
    if folder.is_dir():
        cfg, tensors = load_hf_folder(folder)
        tok = Tokenizer.from_hf_folder(folder)
    else:
        cfg, tensors = load_gguf(path)
        tok = Tokenizer.from_gguf(path)
        _save_converted(folder, cfg, tensors, tok)
    spec = ModelSpec.from_hf_config(cfg)
    if not spec.eos_token_ids and tok.eos_token_id is not None:
        spec = dataclasses.replace(spec, eos_token_ids=(tok.eos_token_id,))
    log.info("loaded %s (%s, %d layers) in %.1fs", path, spec.architecture, spec.num_layers,
             time.perf_counter() - t0)
    return LoadedModel(path, spec, tensors, tok)
