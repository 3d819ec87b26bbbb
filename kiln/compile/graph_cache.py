"""Persistent graph cache: compiled executables on disk, keyed by everything that changes a graph.

    $KILN_CACHE_DIR/graphs/<key>.graph    MAGIC, a JSON header line {sha256, size, graph}, then the payload
    $KILN_CACHE_DIR/graphs/manifest.json  key -> {graph, compile_s, memory_bytes, created}

The key is a hash of a fingerprint dict the runner builds (architecture shapes, dtypes, bucket, KV-cache
shape, backend and device kind, jax/jaxlib versions, XLA flags, GRAPH_VERSION); weight values are arguments
of the graphs, never part of them, so a fine-tune of the same shape hits. Every entry is checksummed: a
truncated or corrupt file is reported, removed and rebuilt, never loaded. Writes go to a temporary file and
are renamed into place, and the manifest is updated under a file lock, so several processes warming the
same cache cannot corrupt it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

GRAPH_VERSION = 2          # bump when kiln's step functions change what they compute
MAGIC = b"KILNGRAPH\x01\n"


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class GraphCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = self.corrupt = 0

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.graph"

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def load(self, key: str, devices=None):
        """The loaded executable for key, or None (a miss, or a corrupt entry that was removed). `devices`: the
        devices it runs on, in mesh order (a sharded graph; None: the backend's devices)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        try:
            if not data.startswith(MAGIC):
                raise ValueError("bad magic")
            header_end = data.index(b"\n", len(MAGIC))
            header = json.loads(data[len(MAGIC):header_end])
            payload = data[header_end + 1:]
            if len(payload) != header["size"]:
                raise ValueError(f"truncated: {len(payload)} of {header['size']} bytes")
            if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise ValueError("checksum mismatch")
            exe_bytes, in_tree, out_tree = pickle.loads(payload)
            exe = serialize_executable.deserialize_and_load(exe_bytes, in_tree, out_tree, execution_devices=devices)
        except Exception as e:  # any damage: report, drop, rebuild
            log.warning("graph cache entry %s is corrupt (%s); removing it, it will be rebuilt", path.name, e)
            self.corrupt += 1
            self.misses += 1
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return exe

    def store(self, key: str, compiled, meta: dict[str, Any]) -> None:
        exe_bytes, in_tree, out_tree = serialize_executable.serialize(compiled)
        payload = pickle.dumps((exe_bytes, in_tree, out_tree))
        header = json.dumps({"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload),
                             "graph": meta.get("graph")}).encode()
        self._atomic_write(self._path(key), MAGIC + header + b"\n" + payload)
        with self._locked():
            manifest = self.manifest()
            manifest[key] = {**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "bytes": len(payload)}
            self._atomic_write(self.root / "manifest.json", json.dumps(manifest, indent=1).encode())

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _atomic_write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _locked(self):
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
