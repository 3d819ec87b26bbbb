"""KVCacheManager: block tables, prefix caching, allocation failure, and a randomized soak test."""

from __future__ import annotations

import random

import pytest

from kiln.cache.kv_manager import KVCacheManager, hash_block

BS = 4


def _run_prefill(mgr: KVCacheManager, rid: str, prompt: list[int]) -> int:
    """Look up, allocate and 'compute' a whole prompt; returns the cached-token count."""
    blocks, n = mgr.get_computed_blocks(rid, prompt)
    assert mgr.allocate_slots(rid, len(prompt), blocks)
    mgr.cache_blocks(rid, prompt, len(prompt))
    mgr.check_invariants()
    return n


def test_hash_block_chained_and_deterministic() -> None:
    h1 = hash_block(None, (1, 2, 3, 4))
    assert h1 == hash_block(None, (1, 2, 3, 4))
    assert -(2**63) <= h1 < 2**63
    assert hash_block(h1, (5, 6, 7, 8)) != hash_block(None, (5, 6, 7, 8))
    assert hash_block(None, (1, 2, 3, 4), ("lora", 1)) != h1


def test_allocate_grow_free() -> None:
    mgr = KVCacheManager(num_blocks=10, block_size=BS)
    assert mgr.allocate_slots("a", 10)
    assert mgr.block_table("a") == [1, 2, 3]
    assert mgr.allocate_slots("a", 12)
    assert len(mgr.block_table("a")) == 3
    assert mgr.allocate_slots("a", 13)
    assert mgr.block_table("a") == [1, 2, 3, 4]
    assert mgr.num_free_blocks == 5 and mgr.usage == pytest.approx(4 / 9)
    mgr.check_invariants()
    mgr.free("a")
    mgr.free("a")  # idempotent
    mgr.free("never-seen")
    assert mgr.block_table("a") == [] and mgr.num_free_blocks == 9
    # freed in reverse order: the sequence's tail is evicted first
    assert mgr.pool.free_block_ids()[-4:] == [4, 3, 2, 1]
    mgr.check_invariants()


def test_prefix_hit_shared_between_live_requests() -> None:
    mgr = KVCacheManager(num_blocks=20, block_size=BS)
    prefix = list(range(100, 112))  # 3 full blocks
    assert _run_prefill(mgr, "a", prefix + [1, 2]) == 0
    assert mgr.pool.num_cached == 3
    blocks, n = mgr.get_computed_blocks("b", prefix + [7, 8, 9])
    assert n == 12 and [b.block_id for b in blocks] == mgr.block_table("a")[:3]
    assert mgr.allocate_slots("b", 15, blocks)
    ta, tb = mgr.block_table("a"), mgr.block_table("b")
    assert tb[:3] == ta[:3] and tb[3] != ta[3]
    assert all(mgr.pool.blocks[i].ref_cnt == 2 for i in ta[:3])
    assert mgr.pool.blocks[ta[3]].ref_cnt == 1
    assert mgr.prefix_queries == 14 + 15 and mgr.prefix_hits == 12
    assert mgr.prefix_hit_rate == pytest.approx(12 / 29)
    s = mgr.stats()
    assert s["blocks_used"] == 5 and s["prefix_hits"] == 12 and s["blocks_cached"] == 3
    mgr.check_invariants()
    mgr.free("a")
    assert all(mgr.pool.blocks[i].ref_cnt == 1 for i in ta[:3])
    mgr.check_invariants()


def test_cached_free_blocks_reused_after_finish() -> None:
    mgr = KVCacheManager(num_blocks=20, block_size=BS)
    prompt = list(range(50, 63))  # 13 tokens: 3 full blocks + 1
    _run_prefill(mgr, "a", prompt)
    first = mgr.block_table("a")
    mgr.free("a")
    assert mgr.num_free_blocks == 19 and mgr.pool.num_cached == 3
    blocks, n = mgr.get_computed_blocks("b", prompt)
    assert n == 12 and [b.block_id for b in blocks] == first[:3]
    assert all(b.ref_cnt == 0 for b in blocks)
    assert mgr.allocate_slots("b", len(prompt), blocks)
    assert mgr.block_table("b")[:3] == first[:3]
    assert mgr.num_free_blocks == 19 - 4
    mgr.check_invariants()


def test_never_the_whole_prompt() -> None:
    mgr = KVCacheManager(num_blocks=20, block_size=BS)
    prompt = list(range(12))  # exactly 3 full blocks
    _run_prefill(mgr, "a", prompt)
    blocks, n = mgr.get_computed_blocks("b", prompt)
    assert n == 8 and len(blocks) == 2  # last block dropped: one token must be computed
    blocks, n = mgr.get_computed_blocks("c", prompt + [99])
    assert n == 12 and len(blocks) == 3
    assert mgr.get_computed_blocks("d", [])[1] == 0


def test_allocation_failure_leaves_state_unchanged() -> None:
    mgr = KVCacheManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    prompt = list(range(12))
    _run_prefill(mgr, "a", prompt)
    mgr.free("a")
    assert mgr.num_free_blocks == 4 and mgr.pool.num_cached == 3
    longer = prompt + list(range(100, 108))  # 20 tokens -> 5 blocks, 3 of them cached-but-free
    blocks, n = mgr.get_computed_blocks("b", longer)
    assert n == 12
    before = (mgr.pool.free_block_ids(), mgr.stats(), [b.ref_cnt for b in mgr.pool.blocks])
    # 2 new blocks needed, but touching the 3 hits leaves only 1 free.
    assert not mgr.allocate_slots("b", len(longer), blocks)
    assert (mgr.pool.free_block_ids(), mgr.stats(), [b.ref_cnt for b in mgr.pool.blocks]) == before
    assert mgr.block_table("b") == []
    mgr.check_invariants()
    # 16 tokens fit exactly: 3 hits + 1 new.
    assert mgr.allocate_slots("b", 16, blocks)
    assert mgr.num_free_blocks == 0
    assert not mgr.allocate_slots("b", 17)
    assert len(mgr.block_table("b")) == 4
    mgr.check_invariants()


def test_extra_keys_and_disabled_caching() -> None:
    mgr = KVCacheManager(num_blocks=20, block_size=BS)
    prompt = list(range(9))
    blocks, _ = mgr.get_computed_blocks("a", prompt, extra=("lora", 1))
    assert mgr.allocate_slots("a", len(prompt), blocks)
    mgr.cache_blocks("a", prompt, len(prompt), extra=("lora", 1))
    assert mgr.get_computed_blocks("b", prompt)[1] == 0
    assert mgr.get_computed_blocks("b", prompt, extra=("lora", 1))[1] == 8

    off = KVCacheManager(num_blocks=20, block_size=BS, enable_prefix_caching=False)
    _run_prefill(off, "a", prompt)
    assert off.get_computed_blocks("b", prompt) == ([], 0)
    assert off.pool.num_cached == 0 and off.prefix_queries == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_randomized_operations(seed: int) -> None:
    """Random prefills/decodes/frees over shared-prefix prompts; simulated KV contents check hits."""
    rng = random.Random(seed)
    mgr = KVCacheManager(num_blocks=32, block_size=BS)
    bases = [[rng.randrange(50) for _ in range(40)] for _ in range(3)]
    content: dict[int, list[int | None]] = {}  # block id -> the tokens "written" into its slots
    live: dict[str, tuple[list[int], list[int]]] = {}  # rid -> (tokens, [num_computed])
    next_id = 0

    def write(rid: str, start: int, stop: int) -> None:
        tokens, table = live[rid][0], mgr.block_table(rid)
        for pos in range(start, stop):
            block = mgr.pool.blocks[table[pos // BS]]
            assert block.ref_cnt == 1 and block.block_hash is None  # never write shared/cached
            content.setdefault(block.block_id, [None] * BS)[pos % BS] = tokens[pos]

    for _ in range(600):
        op = rng.random()
        if op < 0.3 or not live:
            rid = f"r{next_id}"
            next_id += 1
            base = rng.choice(bases)
            prompt = base[: rng.randrange(1, 40)] + [rng.randrange(50) for _ in range(rng.randrange(4))]
            blocks, n = mgr.get_computed_blocks(rid, prompt)
            assert n == len(blocks) * BS and n < len(prompt)
            for i, b in enumerate(blocks):
                assert content[b.block_id] == prompt[i * BS : (i + 1) * BS]  # no stale hit
            before = (mgr.pool.free_block_ids(), [b.ref_cnt for b in mgr.pool.blocks])
            if mgr.allocate_slots(rid, len(prompt), blocks):
                live[rid] = (prompt, [n])
            else:
                assert (mgr.pool.free_block_ids(), [b.ref_cnt for b in mgr.pool.blocks]) == before
        elif op < 0.85:
            rid = rng.choice(sorted(live))
            tokens, computed = live[rid]
            if computed[0] < len(tokens):  # (chunked) prefill
                stop = computed[0] + rng.randrange(1, len(tokens) - computed[0] + 1)
            else:  # decode: the sampled token needs a slot
                tokens.append(rng.randrange(50))
                if not mgr.allocate_slots(rid, len(tokens)):
                    mgr.free(rid)  # preempt
                    del live[rid]
                    mgr.check_invariants()
                    continue
                stop = len(tokens)
            write(rid, computed[0], stop)
            computed[0] = stop
            mgr.cache_blocks(rid, tokens, stop)
        else:
            rid = rng.choice(sorted(live))
            mgr.free(rid)
            del live[rid]
        mgr.check_invariants()

    assert mgr.prefix_hits > 0
    for rid in list(live):
        mgr.free(rid)
    mgr.check_invariants()
    assert mgr.pool.num_used == 0 and mgr.num_free_blocks == 31
    assert mgr.usage == 0.0
    assert mgr.reset_prefix_cache() and mgr.pool.num_cached == 0
