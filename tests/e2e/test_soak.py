"""A 5-minute soak of a real `kiln serve` (the default model, torch float32) under scripts/soak.py's seeded mixed
workload: chat, completions, streams, cancels, n > 1 and hostile requests from 8 clients.

Pass (soak.py --check): no 5xx, the server alive, every KV block free once the load stops, and between the first
and the last quarter of the run RSS grows by at most 120 MB and open fds / threads by at most 8. Native kernel
caches keyed by shape fill in the first minutes and RSS is flat after (BENCHMARKS.md: +49 MB over 5 minutes,
+11 MB from minute 4 to 19 of a 30-minute run). KILN_SOAK_MINUTES changes the length."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MINUTES = float(os.environ.get("KILN_SOAK_MINUTES", "5"))


@pytest.mark.slow
def test_soak_five_minutes(default_gguf, tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "scripts" / "soak.py"), "--minutes", str(MINUTES), "--workers", "8",
           "--sample-seconds", "15", "--out", str(out), "--check", "--max-rss-growth-mb", "120",
           "--", "--backend", "torch", "--dtype", "float32"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60 * MINUTES + 600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["server_alive"] and summary["kv_blocks_used_after"] == 0
    assert summary["statuses"].get("200", 0) > 50 and summary["statuses"].get("400", 0) > 0, summary["statuses"]
    assert not [k for k in summary["statuses"] if k.startswith("5")]
    assert summary["growth_first_to_last_quarter"]["rss_mb"] <= 120
