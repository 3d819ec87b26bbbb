"""`kiln batch --data-parallel-size N` (or `--ray`, `--ray-address`): the same job as batch.py, its lines
answered by N engine replicas on Ray (serving/ray_replicas.py) instead of one in-process engine.

    input ── this process reads, parses, and writes every record (batch.py's _Job, unchanged) ──> <out>.partial
                │ at most --max-in-flight requests (default 2 x max_num_seqs x N), least-loaded routing
                v
           EngineReplica actors 0..N-1 (each: AsyncEngine over its own engine, continuous batching)
           an actor dies ──> its in-flight requests start over on another replica (retry_lost), Ray restarts it

Exactly one record per non-blank line, with no duplicates or gaps, because one writer (this process) owns the
output and a line's record is written only when its request has finished, once: a request that Ray or kiln
retries is still one record. Resume (--resume) is batch.py's: the partial file's records name their lines.

Why actors and not a Ray Dataset mapped through an actor pool: map_batches hands an actor a fixed block and
waits for all of it, while an engine batches continuously and wants a steady stream of requests; a lost block
is re-executed as a whole, so its records would be written twice unless deduplicated anyway; and the records
must land in one resumable file in input-line terms. A Dataset pays off for inputs that live in a distributed
store (S3/GCS parquet); reading such an input with ray.data and feeding this same job is the way to add it.
"""
from __future__ import annotations

import sys
from typing import Any

from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints.batch import FORMATS, BatchAborted, BatchUsageError, check_paths, run_batch


def main(args: Any, engine_kwargs: dict, text_params: SamplingParams, *, factory: str | None = None) -> int:
    """Start (or join) Ray and N replicas, run the job over them, shut them down, summarise."""
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
