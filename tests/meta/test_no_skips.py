"""The suite's own rule: a skipped test fails the run, unless it is marked for hardware this machine lacks."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, body: str, env_hw: str = "") -> subprocess.CompletedProcess:
    """Run pytest on one test file under a copy of the suite's conftest."""
    d = tmp_path / "suite"
    d.mkdir()
    (d / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (d / "test_x.py").write_text(textwrap.dedent(body))
    env = {"PATH": "/usr/bin:/bin", "KILN_TEST_HARDWARE": env_hw, "PYTHONPATH": str(ROOT),
           "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(d)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_a_plain_skip_fails_the_run(tmp_path):
    r = _run(tmp_path, """
        import pytest
        def test_ok(): pass
        def test_skipped(): pytest.skip("model not on this machine")
    """)
    assert r.returncode == 1, r.stdout
    assert "SKIPPED (not allowed)" in r.stdout and "test_skipped" in r.stdout


def test_hardware_marker_skips_with_its_reason_and_passes(tmp_path):
    body = """
        import pytest
        def test_ok(): pass
        @pytest.mark.hardware("gpu", "CUDA graphs per bucket")
        def test_on_gpu(): assert False, "ran without the hardware"
    """
    r = _run(tmp_path, body)
    assert r.returncode == 0, r.stdout
    assert "1 passed, 1 skipped" in r.stdout
    r = _run(tmp_path / "again", body, env_hw="gpu") if (tmp_path / "again").mkdir() is None else None
    assert r.returncode == 1 and "ran without the hardware" in r.stdout
