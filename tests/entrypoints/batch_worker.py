"""A `kiln batch` job on the mock engine, as its own process (the fault tests kill it):
    python -m tests.entrypoints.batch_worker INPUT OUTPUT [--resume] [--step-seconds S]"""
from __future__ import annotations

import argparse
import sys

from kiln.entrypoints import batch as B
from tests.mock_engine import mock_engine


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--step-seconds", type=float, default=0.0)
    a = ap.parse_args()
    engine = mock_engine(max_num_seqs=8, num_blocks=256)
    engine.runner.step_seconds = a.step_seconds
    try:
        stats = B.run_batch(engine, a.input, a.output, resume=a.resume, max_in_flight=8, progress=False,
                            fsync_s=0.05)
    except (B.BatchUsageError, OSError) as e:
        print(f"kiln batch: error: {e}", file=sys.stderr)
        return 2
    print(stats.summary(), file=sys.stderr)
    return 0 if stats.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
