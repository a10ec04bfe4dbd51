"""The page pool: reference-counted KV pages, prefix caching by chained block hashes, fork + copy-on-write.

A page whose tokens are all computed gets a hash chained from its predecessor's, so two
sequences that start with the same tokens map to the same pages. Pages whose reference count
drops to zero go to the tail of a free list but keep their hash: a later prompt can still hit
them, and allocation takes the least recently freed page first (evicting its hash).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from tokenmill.core.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class PrefixCacheStats:
    queries: int = 0      # prompt tokens looked up
    hits: int = 0         # prompt tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}                 # hash -> block id
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) page copies owed before the next forward
        self.stats = PrefixCacheStats()

    # ---- queries -----------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, seq: Sequence, limit: int) -> list[tuple[int, tuple[int, ...]]]:
        """Extend `seq.block_hashes` to every full block among its first `limit` tokens."""
        hashes = seq.block_hashes
        while (len(hashes) + 1) * self.block_size <= limit:
            start = len(hashes) * self.block_size
            tokens = tuple(seq.token_ids[start:start + self.block_size])
            hashes.append((chain_hash(hashes[-1][0] if hashes else None, tokens), tokens))
        return hashes[:limit // self.block_size]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`, leaving at least one token to compute."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        hits = []
        for h, tokens in self._update_hashes(seq, seq.num_tokens - 1):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    # ---- allocation --------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make `seq.block_table` cover its next `num_new_tokens` tokens; False (and no change) if
        the pool cannot. A sequence without pages first takes what the prefix cache holds, which
        advances `seq.num_computed_tokens` (the caller re-reads it)."""
        fresh = not seq.block_table and seq.num_computed_tokens == 0
        hits = self.cached_prefix(seq) if fresh else []
        start = seq.num_computed_tokens + len(hits) * self.block_size
        end = min(start + num_new_tokens, seq.num_tokens)
        need_new = max(0, self.blocks_needed(end) - len(seq.block_table) - len(hits))
        cow = not fresh and self._needs_copy(seq, start)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if need_new + int(cow) > len(self.free) - revived:
            return False
        if fresh and seq.num_preemptions == 0:
            self.stats.queries += seq.num_prompt_tokens
            self.stats.hits += len(hits) * self.block_size
        if hits:
            seq.block_table = [self._take(b) for b in hits]
            seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        if cow:
            self._copy_on_write(seq, start // self.block_size)
        for _ in range(need_new):
            seq.block_table.append(self._take(self._evict()))
        return True

    def _needs_copy(self, seq: Sequence, first_write: int) -> bool:
        idx = first_write // self.block_size
        return idx < len(seq.block_table) and self.blocks[seq.block_table[idx]].ref_count > 1

    def _copy_on_write(self, seq: Sequence, idx: int) -> None:
        src = seq.block_table[idx]
        dst = self._take(self._evict())
        self.blocks[src].ref_count -= 1
        seq.block_table[idx] = dst
        self.pending_copies.append((src, dst))

    def _evict(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        self.free[block_id] = None      # _take removes it again
        return block_id

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
        return block_id

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.block_table = list(parent.block_table)
        for b in child.block_table:
            self.blocks[b].ref_count += 1

    def free_seq(self, seq: Sequence) -> None:
        # Tail pages first, so a prefix outlives its continuations in the LRU order.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of pages whose tokens are now all computed."""
        if not self.enable_prefix_caching:
            return
        for block_id, (h, tokens) in zip(seq.block_table, self._update_hashes(seq, seq.num_computed_tokens)):
            block = self.blocks[block_id]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.cached.setdefault(h, block_id)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
