"""Per-request block tables and prefix caching over a ``BlockPool`` (vLLM v1 ``kv_cache_manager.py``).

The scheduler drives one request through these calls:

1. ``get_computed_blocks(rid, prompt)`` -> the cached leading full blocks and how many tokens they
   cover (never the whole prompt: one token is always left to compute so there are logits).
2. ``allocate_slots(rid, total_tokens, computed_blocks)`` -> True if the block table now covers
   ``total_tokens``; False (changing nothing) if the pool is short. Called again each step to grow.
3. After the step ran, ``cache_blocks(rid, tokens, num_computed_tokens)`` registers the chained
   hashes of blocks that just became full, so other requests can hit them.
4. ``free(rid)`` when finished or preempted: blocks go back to the pool in reverse order and
   stay hittable until evicted.

Block hashes chain: ``hash(block i) = H(hash(block i-1), tokens of block i, extra)``, so equal hashes
mean equal whole prefixes. ``extra`` carries whatever else changes the KV values (e.g. a LoRA id) and
must be the same in every call for one request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from kiln.cache.block_pool import NULL_BLOCK_ID, Block, BlockPool


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...], extra: tuple = ()) -> int:
    """Chained hash of one full block: sha256 of a stable encoding, truncated to a signed int64.

    Deterministic across processes as long as ``extra`` holds only ints, strs, bools, None or tuples.
    """
    payload = repr((parent_hash, tuple(token_ids), tuple(extra))).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little", signed=True)


class KVCacheManager:
    """Maps request ids to block tables, with prefix caching of full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._tables: dict[str, list[Block]] = {}
        self._hashes: dict[str, list[int]] = {}  # chained hashes of each request's full blocks so far
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens served from cached blocks

    # ------------------------------------------------------------------ prefix lookup
    def get_computed_blocks(
        self, request_id: str, token_ids: Sequence[int], *, extra: tuple = ()
    ) -> tuple[list[Block], int]:
        """The longest run of leading full blocks of ``token_ids`` already cached.

        Returns ``(blocks, num_cached_tokens)``. At least one token is always left uncached. The
        blocks are not referenced yet: pass them to ``allocate_slots`` before anything else
        allocates, or they may be evicted. ``request_id`` is for symmetry and logging only.
        """
        del request_id
        if not self.enable_prefix_caching or not token_ids:
            return [], 0
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs  # leave >= 1 token to compute
        blocks: list[Block] = []
        parent: int | None = None
        for i in range(max_blocks):
            parent = hash_block(parent, tuple(token_ids[i * bs : (i + 1) * bs]), extra)
            block = self.pool.get_cached_block(parent)
            if block is None:
                break
            blocks.append(block)
        num_cached = len(blocks) * bs
        self.prefix_queries += len(token_ids)
        self.prefix_hits += num_cached
        return blocks, num_cached

    @property
    def prefix_hit_rate(self) -> float:
        """Fraction of queried prompt tokens served from the prefix cache (0.0 before any query)."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    # ------------------------------------------------------------------ allocation
    def allocate_slots(
        self, request_id: str, num_tokens_total: int, computed_blocks: Sequence[Block] | None = None
    ) -> bool:
        """Grow ``request_id``'s block table to hold ``num_tokens_total`` tokens.

        ``computed_blocks`` (from ``get_computed_blocks``, first allocation only) are referenced and
        become the head of the table. Returns False, changing nothing, if the pool is short.
        """
        table = self._tables.get(request_id)
        computed = list(computed_blocks or ())
        if table is not None and computed:
            raise ValueError(f"computed_blocks given for already-allocated request {request_id!r}")
        have = len(table) if table is not None else 0
        needed = -(-num_tokens_total // self.block_size)  # ceil
        num_new = max(0, needed - have - len(computed))
        # Touching a computed block that sits in the free queue takes it out of the free count.
        evictable_computed = sum(1 for b in computed if b.ref_cnt == 0)
        if num_new > self.pool.num_free_blocks - evictable_computed:
            return False
        if table is None:
            table = self._tables[request_id] = []
            self._hashes[request_id] = []
        self.pool.touch(computed)  # before get_new_blocks, so they cannot be evicted by it
        table.extend(computed)
        table.extend(self.pool.get_new_blocks(num_new))
        return True

    def cache_blocks(
        self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int, *, extra: tuple = ()
    ) -> None:
        """Register the hash of every block of ``request_id`` that is now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        hashes = self._hashes[request_id]
        bs = self.block_size
        num_full = min(num_computed_tokens, len(token_ids)) // bs
        if num_full > len(table):
            raise ValueError(f"{request_id!r}: {num_full} full blocks but table holds {len(table)}")
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            h = hash_block(parent, tuple(token_ids[i * bs : (i + 1) * bs]), extra)
            hashes.append(h)
            self.pool.cache_full_block(table[i], h)

    def free(self, request_id: str) -> None:
        """Release all of the request's blocks (tail first) and forget it. Unknown ids are ignored."""
        table = self._tables.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if table:
            self.pool.free_blocks(reversed(table))

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes; only when no request holds blocks. Returns success."""
        return self.pool.reset_prefix_cache()

    # ------------------------------------------------------------------ introspection
    def block_table(self, request_id: str) -> list[int]:
        """Block ids of the request, in token order (empty for unknown ids)."""
        return [b.block_id for b in self._tables.get(request_id, ())]

    @property
    def num_free_blocks(self) -> int:
        """Allocatable blocks, cached-but-free ones included."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks (null block excluded) referenced by requests."""
        return self.pool.num_used / (self.pool.num_blocks - 1)

    def stats(self) -> dict[str, float]:
        """Counters for metrics and logs."""
        return {
            "blocks_used": self.pool.num_used,
            "blocks_free": self.pool.num_free_blocks,
            "blocks_cached": self.pool.num_cached,
            "usage": self.usage,
            "prefix_queries": self.prefix_queries,
            "prefix_hits": self.prefix_hits,
            "prefix_hit_rate": self.prefix_hit_rate,
        }

    def check_invariants(self) -> None:
        """Raise AssertionError if tables and pool disagree (for tests)."""
        self.pool.check_invariants()
        refs = [0] * self.pool.num_blocks
        for rid, table in self._tables.items():
            if len({b.block_id for b in table}) != len(table):
                raise AssertionError(f"{rid!r} holds a block twice")
            if len(self._hashes[rid]) > len(table):
                raise AssertionError(f"{rid!r} has more block hashes than blocks")
            for block in table:
                if block.block_id == NULL_BLOCK_ID:
                    raise AssertionError(f"null block in table of {rid!r}")
                if self.pool.blocks[block.block_id] is not block:
                    raise AssertionError(f"foreign block in table of {rid!r}: {block!r}")
                refs[block.block_id] += 1
        for block in self.pool.blocks:
            if block.ref_cnt != refs[block.block_id]:
                raise AssertionError(f"{block!r} held by {refs[block.block_id]} tables")
