"""`kiln batch --data-parallel-size N` (or `--ray-address` alone): the same job as batch.py, its lines
answered by N engine replicas on Ray (serving/ray_replicas.py) instead of one in-process engine.

    input ── this process reads, parses, and writes every record (batch.py's _Job, unchanged) ──> <out>.partial
                │ at most --max-in-flight requests (default 2 x max_num_seqs x N), least-loaded routing
                v
           EngineReplica actors 0..N-1 (each: AsyncEngine over its own engine, continuous batching)
           an actor dies ──> its in-flight requests start over on another replica (retry_lost), Ray restarts it

Exactly one record per non-blank line, with no duplicates or gaps, because one writer (this process) owns the
output and a line's record is written only when its request has finished, once: a request that Ray or kiln
retries is still one record. Resume (--resume) is batch.py's: the partial file's records name their lines.

Why actors, beside the Ray Data path (`--ray`, batch_ray_data.py): an engine batches continuously and wants a
steady stream of requests, which this path gives it (a Dataset hands an actor fixed blocks and waits for each
to drain); an actor's death restarts only its in-flight requests, not a whole block; on one machine it is the
faster one (BENCHMARKS.md). `--data-parallel-size N` without `--ray` runs here.
"""
from __future__ import annotations

import sys
from typing import Any

from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints.batch import FORMATS, BatchAborted, BatchUsageError, check_paths, run_batch


def main(args: Any, engine_kwargs: dict, text_params: SamplingParams, *, factory: str | None = None) -> int:
    """Start (or join) Ray and N replicas, run the job over them, shut them down, summarise. With --ray the
    job runs on Ray Data instead (batch_ray_data.py)."""
    if getattr(args, "ray", False):
        from kiln.entrypoints import batch_ray_data
        return batch_ray_data.main(args, engine_kwargs, text_params, factory=factory)
    from kiln.config import Env
    from kiln.serving.ray_replicas import require_ray, start_replicas
    check_paths(args.input, args.output, resume=args.resume, overwrite=args.overwrite)
    if args.format not in FORMATS:
        raise BatchUsageError(f"format must be one of {', '.join(FORMATS)}")
    require_ray()
    n = max(args.data_parallel_size, 1)
    engine = start_replicas(n, engine_kwargs, factory=factory, retry_lost=True,
                            address=args.ray_address or Env.read().ray_address)
    try:
        in_flight = args.max_in_flight or 2 * engine.engine.config.scheduler.max_num_seqs * n
        stats = run_batch(engine, args.input, args.output, fmt=args.format, resume=args.resume,
                          overwrite=args.overwrite, max_in_flight=in_flight, text_params=text_params,
                          progress=not args.no_progress)
    except BatchAborted as e:
        print(f"kiln batch: {e}", file=sys.stderr)
        return 1
    finally:
        engine.shutdown()
    print(f"{stats.summary()} [{n} replicas on Ray; {engine.lost} requests retried after a replica died]",
          file=sys.stderr)
    return 0 if stats.failed == 0 else 1
