"""BlockPool: allocation, ref counts, LRU free queue, prefix-hash map."""

from __future__ import annotations

import pytest

from kiln.cache.block_pool import NULL_BLOCK_ID, BlockPool, NoFreeBlocksError


def test_null_block_reserved() -> None:
    pool = BlockPool(num_blocks=5, block_size=4)
    assert pool.num_free_blocks == 4
    blocks = pool.get_new_blocks(4)
    assert NULL_BLOCK_ID not in [b.block_id for b in blocks]
    assert pool.num_free_blocks == 0 and pool.num_used == 4
    with pytest.raises(NoFreeBlocksError):
        pool.get_new_blocks(1)
    with pytest.raises(ValueError):
        pool.touch([pool.null_block])
    pool.check_invariants()


def test_alloc_free_ref_counts() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    a = pool.get_new_blocks(3)
    assert [b.block_id for b in a] == [1, 2, 3]
    assert all(b.ref_cnt == 1 for b in a)
    pool.touch(a[:1])
    assert a[0].ref_cnt == 2
    pool.free_blocks(a)
    assert a[0].ref_cnt == 1 and not pool.is_free(a[0])
    assert pool.is_free(a[1]) and pool.is_free(a[2])
    pool.free_blocks(a[:1])
    assert pool.num_used == 0 and pool.num_free_blocks == 7
    with pytest.raises(ValueError):
        pool.free_blocks(a[:1])
    pool.check_invariants()


def test_not_enough_blocks_allocates_nothing() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    before = pool.free_block_ids()
    with pytest.raises(NoFreeBlocksError):
        pool.get_new_blocks(4)
    assert pool.free_block_ids() == before
    pool.check_invariants()


def test_lru_eviction_order_tail_first() -> None:
    pool = BlockPool(num_blocks=7, block_size=2)
    a = pool.get_new_blocks(3)  # 1, 2, 3
    b = pool.get_new_blocks(3)  # 4, 5, 6
    for i, blk in enumerate(a + b):
        pool.cache_full_block(blk, 100 + i)
    pool.free_blocks(reversed(a))  # request a finishes first, tail first
    pool.free_blocks(reversed(b))
    assert pool.free_block_ids() == [3, 2, 1, 6, 5, 4]
    assert pool.num_cached == 6
    # Touching a cached free block removes it from the middle of the queue.
    hit = pool.get_cached_block(100 + 4)  # block 5
    assert hit is b[1]
    pool.touch([hit])
    assert pool.free_block_ids() == [3, 2, 1, 6, 4]
    # New blocks come from the head and lose their hashes.
    new = pool.get_new_blocks(2)
    assert [x.block_id for x in new] == [3, 2]
    assert all(x.block_hash is None for x in new)
    assert pool.get_cached_block(102) is None and pool.get_cached_block(101) is None
    assert pool.get_cached_block(100) is a[0]
    assert pool.num_cached == 4
    pool.check_invariants()


def test_cache_full_block_duplicates_and_disabled() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    x, y = pool.get_new_blocks(2)
    pool.cache_full_block(x, 7)
    pool.cache_full_block(y, 7)  # duplicate content: first stays canonical
    assert pool.get_cached_block(7) is x and y.block_hash is None
    pool.check_invariants()

    off = BlockPool(num_blocks=4, block_size=2, enable_prefix_caching=False)
    (z,) = off.get_new_blocks(1)
    off.cache_full_block(z, 7)
    assert off.get_cached_block(7) is None and off.num_cached == 0


def test_reset_prefix_cache() -> None:
    pool = BlockPool(num_blocks=4, block_size=2)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_block(blocks[0], 1)
    assert not pool.reset_prefix_cache()  # blocks in use
    assert pool.num_cached == 1
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache()
    assert pool.num_cached == 0 and blocks[0].block_hash is None
    pool.check_invariants()
