import pytest

from kiln.compile.planner import PlanError, order_buckets, plan_memory, stable_block_count

GIB = 2**30


def test_split_adds_up():
    p = plan_memory(free_bytes=10 * GIB, memory_utilization=0.8, graph_reserved_fraction=0.25,
                    graph_prompt_ratio=0.5, bytes_per_block=GIB // 64, block_size=16, max_model_len=1024)
    assert p.usable_bytes == 8 * GIB
    assert p.prompt_graph_bytes == p.decode_graph_bytes == GIB
    assert p.kv_bytes == 6 * GIB
    assert p.num_blocks == 384                      # 6 GiB / (1/64 GiB), already 4 significant bits
    assert p.prompt_graph_bytes + p.decode_graph_bytes + p.kv_bytes == p.usable_bytes


def test_given_kv_budget_leaves_the_rest_to_graphs():
    p = plan_memory(free_bytes=10 * GIB, memory_utilization=0.5, graph_reserved_fraction=0.9,
                    graph_prompt_ratio=0.25, bytes_per_block=GIB // 1024, block_size=16, max_model_len=1024,
                    kv_bytes=GIB)
    assert p.kv_bytes == GIB and p.num_blocks == 1024
    assert p.prompt_graph_bytes == GIB and p.decode_graph_bytes == 3 * GIB


def test_too_small_kv_cache_names_the_knobs():
    with pytest.raises(PlanError, match="max_model_len=4096.*--memory-utilization"):
        plan_memory(free_bytes=GIB, memory_utilization=0.1, graph_reserved_fraction=0.5, graph_prompt_ratio=0.5,
                    bytes_per_block=GIB // 256, block_size=16, max_model_len=4096)
    with pytest.raises(PlanError, match="--kv-cache-gib"):
        plan_memory(free_bytes=GIB, memory_utilization=0.5, graph_reserved_fraction=0.1, graph_prompt_ratio=0.5,
                    bytes_per_block=1024, block_size=16, max_model_len=16, kv_bytes=GIB)


def test_block_count_is_stable_under_jitter():
    assert stable_block_count(1000) == stable_block_count(1010) == 960
    assert stable_block_count(15) == 15
    assert all(stable_block_count(n) <= n for n in range(1, 5000, 7))


def test_strategies_order():
    b = [(1, 64), (4, 16), (2, 16), (1, 16)]
    assert order_buckets(b, "min_tokens") == [(1, 16), (2, 16), (1, 64), (4, 16)]
    assert order_buckets(b, "max_bs") == [(4, 16), (2, 16), (1, 16), (1, 64)]
    with pytest.raises(PlanError):
        order_buckets(b, "nope")
