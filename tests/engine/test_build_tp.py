"""The KV memory plan of a tensor-parallel engine (engine/build.py, compile/planner.py): each device holds 1/tp of
a block when the KV heads split over the mesh, all of it when they do not (GQA, replicated), so the same
per-device budget holds tp times the blocks, or the same number; GetModelInfo reports it. The bytes are computed
by hand from the model's shape here; tests/backends/test_jax_mesh.py checks them against the arrays the runner
really allocates on each device."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from kiln.compile.planner import kv_block_bytes_per_device
from kiln.engine.build import build_config
from kiln.entrypoints.grpc_proto import model_info_pb
from kiln.models.loader import load_model
from tests.tiny import save_tiny_model

GIB = 2**30
# llama-gqa: 2 layers, 2 KV heads of 24, float32, 16-token blocks: K and V
WHOLE = 2 * 2 * 16 * 2 * 24 * 4


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = str(save_tiny_model(tmp_path_factory.mktemp("m") / "gqa", "llama-gqa"))
    return load_model(folder, folder).spec


def _config(spec, tp, **kw):
    return build_config(spec, backend="jax", dtype="float32", max_model_len=64, warmup=False, platform="tpu",
                        free_bytes=64 * GIB, tensor_parallel_size=tp, **kw)


def test_block_bytes_rule():
    assert kv_block_bytes_per_device(1200, num_kv_heads=8, tp=4) == (300, 4)
    assert kv_block_bytes_per_device(1200, num_kv_heads=2, tp=4) == (1200, 1)     # GQA: replicated
    assert kv_block_bytes_per_device(1200, num_kv_heads=3, tp=1) == (1200, 1)


def test_same_budget_per_device_holds_tp_times_the_blocks(spec, caplog):
    budget = 0.01                                                   # GiB per device
    one = _config(spec, 1, kv_cache_gib=budget)
    with caplog.at_level(logging.INFO, logger="kiln.engine.build"):
        two = _config(spec, 2, kv_cache_gib=budget)
    four = _config(spec, 4, kv_cache_gib=budget)
    n = int(budget * GIB)
    assert (one.memory.kv_bytes_per_block, one.memory.kv_shards, one.cache.num_blocks) == (WHOLE, 1, n // WHOLE)
    assert (two.memory.kv_bytes_per_block, two.memory.kv_shards) == (WHOLE // 2, 2)
    assert two.cache.num_blocks == n // (WHOLE // 2) and two.cache.num_blocks >= 2 * one.cache.num_blocks
    # 2 KV heads over 4 devices: replicated, a block costs its whole bytes on each, so no more blocks than TP=1
    assert (four.memory.kv_bytes_per_block, four.memory.kv_shards, four.cache.num_blocks) == \
        (WHOLE, 1, one.cache.num_blocks)
    assert f"{two.cache.num_blocks} blocks per device, {WHOLE // 2} bytes per block per device" in caplog.text
    assert "1 of 2 KV heads per device" in caplog.text


def test_free_memory_split_the_same_way(spec):
    one, two = _config(spec, 1), _config(spec, 2)                   # 64 GiB free on each device (tpu)
    assert one.memory.kv_bytes == two.memory.kv_bytes               # the same per-device budget ...
    assert two.cache.num_blocks >= 2 * one.cache.num_blocks - 16    # ... twice the blocks (4-bit rounding)
    # forced CPU devices share the host's memory: each of them plans with its part of it
    cpu1 = build_config(spec, backend="jax", dtype="float32", max_model_len=64, warmup=False, platform="cpu",
                        free_bytes=8 * GIB, tensor_parallel_size=1)
    cpu2 = build_config(spec, backend="jax", dtype="float32", max_model_len=64, warmup=False, platform="cpu",
                        free_bytes=8 * GIB, tensor_parallel_size=2)
    assert cpu2.memory.free_bytes == cpu1.memory.free_bytes // 2


def test_given_block_count_is_per_device(spec):
    c = _config(spec, 2, num_blocks=40)
    assert c.cache.num_blocks == 40 and c.memory.kv_bytes == 40 * WHOLE // 2


def test_model_info_reports_the_split(spec):
    cfg = _config(spec, 2, num_blocks=40)
    engine = SimpleNamespace(engine=SimpleNamespace(config=cfg, spec=spec), stats=lambda: {})
    info = model_info_pb(engine, "gqa", "tpu")
    assert (info.tensor_parallel_size, info.kv_bytes_per_block, info.kv_shards) == (2, WHOLE // 2, 2)
    assert info.cache.blocks_total == 39
    info = model_info_pb(SimpleNamespace(engine=SimpleNamespace(config=_config(spec, 4, num_blocks=40), spec=spec),
                                         stats=lambda: {}), "gqa", "tpu")
    assert (info.tensor_parallel_size, info.kv_bytes_per_block, info.kv_shards) == (4, WHOLE, 1)


def test_torch_tensor_parallel_refused_with_the_reason(spec):
    with pytest.raises(ValueError, match="no tensor parallelism: on a CPU it does not pay.*torch_tp_cpu.py"):
        build_config(spec, backend="torch", dtype="float32", max_model_len=64, warmup=False, platform="cpu",
                     tensor_parallel_size=2)
    c = build_config(spec, backend="torch", dtype="float32", max_model_len=64, warmup=False, platform="cpu",
                     tensor_parallel_size=1, num_blocks=8)
    assert c.parallel.tensor_parallel_size == 1 and c.memory.kv_shards == 1
    # backend auto with TP: the jax backend, whatever auto picks for one device
    auto = build_config(spec, backend="auto", dtype="float32", max_model_len=64, warmup=False, platform="cpu",
                        tensor_parallel_size=2, num_blocks=8)
    assert auto.backend == "jax" and auto.model.backend == "auto"
