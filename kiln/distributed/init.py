"""Starting JAX's multi-process runtime from kiln's ParallelConfig (flags or KILN_*/JAX_* environment, read in
config.py): `jax.distributed.initialize(coordinator, num_processes, process_id)`, once, before JAX touches a
device. After it, `jax.devices()` lists every process's devices and a Mesh over them is global (TPU pod slices,
GPU nodes; on CPU the cross-process collectives are gloo's, jaxlib's default)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_started: tuple | None = None


def initialize(parallel) -> bool:
    """Start jax.distributed for `parallel` (a config.ParallelConfig) when it spans processes; True if it
    did (or already had, with the same settings). A second call with other settings is an error."""
    global _started
    if parallel.num_processes <= 1:
        return False
    want = (parallel.coordinator_address, parallel.num_processes, parallel.process_id)
    if _started is not None:
        if _started != want:
            raise RuntimeError(f"jax.distributed already started as {_started}, now asked for {want}")
        return True
    import jax
    jax.distributed.initialize(coordinator_address=parallel.coordinator_address,
                               num_processes=parallel.num_processes, process_id=parallel.process_id)
    _started = want
    log.info("jax.distributed: process %d of %d, coordinator %s; %d devices (%d local)", parallel.process_id,
             parallel.num_processes, parallel.coordinator_address, jax.device_count(), jax.local_device_count())
    return True


def is_leader(parallel) -> bool:
    """Process 0 schedules, serves and broadcasts steps; the others follow."""
    return parallel.process_id == 0
