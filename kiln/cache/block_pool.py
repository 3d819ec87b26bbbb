"""The block pool: every KV-cache block, its reference count, and the prefix-cache index.

Pure Python bookkeeping, modelled on vLLM v1 ``block_pool.py`` and nano-vllm ``block_manager.py``.

* Block 0 is the reserved *null block*: never handed out, never freed. Padded rows of a batch point
  at it and are masked, so it may hold garbage.
* A block with ``ref_cnt == 0`` sits in the *free queue*, an ``OrderedDict`` kept in eviction
  order: ``get_new_blocks`` pops from the head, ``free_blocks`` appends at the tail, and ``touch``
  removes a block from the middle in O(1) when a cached block is reused.
* A *full* block may carry a ``block_hash`` (a chained hash of its tokens and all tokens before
  it). ``_cached`` maps hash -> block. A freed block keeps its hash, so it stays reusable until it
  reaches the head of the free queue and is handed out again; only then is it evicted from the map.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

NULL_BLOCK_ID = 0


@dataclass(eq=False)
class Block:
    """One KV-cache block (``block_size`` token slots in every layer's K and V arrays)."""

    block_id: int  # index into the paged KV arrays' ``num_blocks`` axis
    ref_cnt: int = 0  # number of live request block tables holding this block
    block_hash: int | None = None  # chained prefix hash, set once the block is full and cached

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class NoFreeBlocksError(RuntimeError):
    """Raised when more blocks are requested than the free queue holds."""


class BlockPool:
    """All blocks of one KV cache: ref counts, the LRU free queue and the hash -> block map."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks)]
        self.null_block: Block = self.blocks[NULL_BLOCK_ID]
        # Eviction order: head (first) is evicted next; freed blocks are appended at the tail.
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[int, Block] = {}

    # ------------------------------------------------------------------ allocation
    def get_new_blocks(self, n: int) -> list[Block]:
        """Pop ``n`` blocks from the head of the free queue, evicting their cached hashes.

        The returned blocks have ``ref_cnt == 1``. Raises ``NoFreeBlocksError`` (allocating nothing)
        if fewer than ``n`` blocks are free.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > len(self._free):
            raise NoFreeBlocksError(f"requested {n} blocks, only {len(self._free)} free")
        out: list[Block] = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash: int) -> Block | None:
        """The cached block with this hash (in use or free), or None."""
        if not self.enable_prefix_caching:
            return None
        return self._cached.get(block_hash)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block; a block at ref 0 leaves the free queue."""
        for block in blocks:
            if block.block_id == NULL_BLOCK_ID:
                raise ValueError("the null block cannot be referenced")
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[Block]) -> None:
        """Drop one reference on each block, in the given order.

        A block reaching ref 0 is appended to the free-queue tail (keeping its hash, so it can
        still be hit). Callers pass a request's blocks in *reverse* order so that the tail of a
        sequence is evicted before its head.
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0 or block.block_id == NULL_BLOCK_ID:
                raise ValueError(f"double free of {block!r}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    # ------------------------------------------------------------------ prefix cache
    def cache_full_block(self, block: Block, block_hash: int) -> None:
        """Register a full block under ``block_hash`` so later requests can reuse it.

        No-op when prefix caching is off, when the block is already cached, or when another block
        already holds this hash (a duplicate computed concurrently: the first one stays canonical
        and the duplicate is recycled as a plain block when freed).
        """
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only allowed when no block is in use (like vLLM).

        Returns True on success, False (changing nothing) if some block is still referenced.
        """
        if self.num_used:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return True

    def _evict(self, block: Block) -> None:
        """Remove a block's hash from the map (it is about to be overwritten)."""
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    # ------------------------------------------------------------------ counters
    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free queue, cached-but-free ones included (the null block excluded)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - 1 - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks carrying a prefix hash (in use or free)."""
        return len(self._cached)

    def free_block_ids(self) -> list[int]:
        """Free-queue block ids in eviction order (head first); for tests and debugging."""
        return list(self._free)

    def is_free(self, block: Block) -> bool:
        """Whether the block sits in the free queue."""
        return block.block_id in self._free

    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's own bookkeeping is inconsistent."""
        null = self.null_block
        if null.ref_cnt != 0 or null.block_hash is not None or NULL_BLOCK_ID in self._free:
            raise AssertionError(f"null block misused: {null!r}")
        for block in self.blocks[1:]:
            if block.ref_cnt < 0:
                raise AssertionError(f"negative ref count: {block!r}")
            if (block.ref_cnt == 0) != (block.block_id in self._free):
                raise AssertionError(f"ref 0 <=> free violated: {block!r}")
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                raise AssertionError(f"hashed block missing from map: {block!r}")
        for h, block in self._cached.items():
            if block.block_hash != h or self.blocks[block.block_id] is not block:
                raise AssertionError(f"map entry {h} -> {block!r} inconsistent")
        for bid, block in self._free.items():
            if self.blocks[bid] is not block:
                raise AssertionError(f"free queue entry {bid} -> {block!r} inconsistent")
