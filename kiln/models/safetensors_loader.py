"""Load an HF model folder (`config.json` + `model.safetensors` or index-sharded `model-*.safetensors`)
as (config dict, {HF tensor name: float32 numpy array}).

`safetensors`' numpy framework cannot express bfloat16, so BF16 tensors are read straight from the file
(the format is an 8-byte header length, a JSON header, then raw little-endian data) as `ml_dtypes.bfloat16`.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kiln.models.spec import ModelError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder, via the shard index when there is one."""
    index = folder / INDEX_FILE
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise ModelError(f"{index} names missing shards: {', '.join(missing) or '(none listed)'}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise ModelError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def _read_bf16(path: Path, name: str) -> np.ndarray:
    """One BF16 tensor read raw from a safetensors file, as float32."""
    import ml_dtypes

    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_len))[name]
        start, end = info["data_offsets"]
        f.seek(8 + header_len + start)
        raw = f.read(end - start)
    return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"]).astype(np.float32)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file; floating tensors converted to float32."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                if f.get_slice(name).get_dtype() == "BF16":
                    out[name] = _read_bf16(path, name)
                    continue
                w = f.get_tensor(name)
                out[name] = w.astype(np.float32) if np.issubdtype(w.dtype, np.floating) else w
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    return out


def load_hf_folder(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read an HF checkpoint folder into (config dict, {HF tensor name: float32 array})."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise ModelError(f"no config.json in {folder}")
    cfg = _read_json(folder / "config.json")
    tensors: dict[str, np.ndarray] = {}
    files = weight_files(folder)
    for f in files:
        tensors.update(read_safetensors(f))
    log.info("loaded %s: %d tensors from %d file(s)", folder, len(tensors), len(files))
    return cfg, tensors
