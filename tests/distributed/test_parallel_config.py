"""ParallelConfig: the multi-host settings come from flags first, then KILN_* or JAX_* environment variables (read
only by config.Env), and impossible combinations are refused with the flag to fix; the CLI flags reach it."""
from __future__ import annotations

import pytest

from kiln.config import Env, ParallelConfig
from kiln.entrypoints.args import engine_kwargs
from kiln.entrypoints.cli import build_parser


def test_flags_then_kiln_then_jax_environment():
    env = Env.read({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "KILN_PROCESS_ID": "2",
                    "JAX_PROCESS_ID": "3"})
    p = ParallelConfig.of(env, tensor_parallel_size=8)
    assert (p.coordinator_address, p.num_processes, p.process_id, p.tensor_parallel_size) == ("h0:1234", 4, 2, 8)
    p = ParallelConfig.of(env, coordinator_address="h9:1", process_id=0)
    assert (p.coordinator_address, p.process_id) == ("h9:1", 0)
    assert ParallelConfig.of(Env.read({})) == ParallelConfig()


def test_refusals():
    with pytest.raises(ValueError, match="--coordinator-address"):
        ParallelConfig(num_processes=2)
    with pytest.raises(ValueError, match="process_id must be in"):
        ParallelConfig(num_processes=2, process_id=2, coordinator_address="h:1")
    with pytest.raises(ValueError, match="at least 1"):
        ParallelConfig(tensor_parallel_size=0)


def test_cli_flags_reach_the_engine_options():
    a = build_parser().parse_args(["serve", "--tensor-parallel-size", "2", "--coordinator-address", "h:1",
                                   "--num-processes", "2", "--process-id", "1", "--data-parallel-size", "3"])
    kw = engine_kwargs(a)
    assert (kw["tensor_parallel_size"], kw["coordinator_address"], kw["num_processes"], kw["process_id"]) == \
        (2, "h:1", 2, 1)
    assert a.data_parallel_size == 3 and "num_processes" not in engine_kwargs(build_parser().parse_args(["serve"]))
