"""The page pool: reference-counted KV pages, prefix caching by chained block hashes, fork + copy-on-write.

A page whose tokens are all computed gets a hash chained from its predecessor's, so two
sequences that start with the same tokens map to the same pages. Pages whose reference count
drops to zero go to the tail of a free list but keep their hash: a later prompt can still hit
them, and allocation takes the least recently freed page first (evicting its hash).

A hit is never taken on the hash alone (crafted prompts whose hashes collide would read another
request's KV, vLLM's CVE-2025-25183): the hash is SHA-256 of (parent hash, tokens), and a hit must
also hold the same tokens and have been computed after the very page (id and generation) that
the lookup matched one level up, so the whole chain is verified, whatever the hash function.

KV groups (see kv_cache.py): a model whose layers attend over different windows keeps one table
per group in `seq.block_tables`; all tables draw from this one pool. A page of a sliding-window
group is released (its entry becomes -1) as soon as the first token a step computes can no longer
see any of its positions; full-attention tables keep every page. The prefix cache serves models
with a single full-attention group only.
"""
from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from tokenmill.core.sequence import Sequence

HashFn = Callable[[bytes | None, tuple[int, ...]], bytes]


def chain_hash(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    return hashlib.sha256((parent or b"") + array("q", token_ids).tobytes()).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()
    parent: tuple[int, int] | None = None   # (block id, generation) of the page before it when it was hashed
    generation: int = 0                     # renewed each time the page gets a hash


@dataclass
class PrefixCacheStats:
    queries: int = 0      # prompt tokens looked up
    hits: int = 0         # prompt tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_fn: HashFn = chain_hash, windows: tuple[int | None, ...] = (None,)):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        if enable_prefix_caching and windows != (None,):
            raise ValueError("prefix caching needs a single full-attention KV group; this model has windows "
                             f"{windows}: turn enable_prefix_caching off")
        self.block_size = block_size
        self.windows = windows          # per KV group: its attention window, None for full attention
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_fn = hash_fn
        self.cached: dict[bytes, int] = {}               # hash -> block id
        self._generations = itertools.count(1)
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

    def writable_slots(self, seq: Sequence, position: int) -> int:
        """How many positions from `position` on `seq` may write into its own pages (0 when the page
        of `position` is shared, or missing)."""
        idx = position // self.block_size
        for table in seq.block_tables:
            if idx >= len(table) or table[idx] < 0 or self.blocks[table[idx]].ref_count > 1:
                return 0
        return min(len(table) for table in seq.block_tables) * self.block_size - position

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def pages_for(self, num_tokens: int, chunk: int) -> int:
        """The most pages one sequence of `num_tokens` holds at once, computing <= `chunk` tokens a step
        (lookahead slots included)."""
        full = self.blocks_needed(num_tokens)
        return sum(full if w is None else min(full, self.blocks_needed(w - 1 + chunk) + 1) for w in self.windows)

    def max_tokens(self, chunk: int, limit: int) -> int:
        """The longest sequence (at most `limit`) that the pool holds alone, computing <= `chunk`
        tokens a step."""
        low, high = 0, limit                  # pages_for grows with the length: bisect
        while low < high:
            mid = (low + high + 1) // 2
            if self.pages_for(mid, chunk) <= self.num_blocks:
                low = mid
            else:
                high = mid - 1
        return low

    def _update_hashes(self, seq: Sequence, num_blocks: int) -> None:
        """Extend `seq.block_hashes` to its first `num_blocks` blocks (all full)."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            start = len(hashes) * size
            tokens = tuple(seq.token_ids[start:start + size])
            hashes.append((self.hash_fn(hashes[-1][0] if hashes else None, tokens), tokens))

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`, leaving at least one token to compute."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        num_full = (seq.num_tokens - 1) // self.block_size
        self._update_hashes(seq, num_full)
        hits: list[int] = []
        for h, tokens in itertools.islice(seq.block_hashes, num_full):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent = (hits[-1], self.blocks[hits[-1]].generation) if hits else None
            if block.token_ids != tokens or block.parent != parent:
                break
            hits.append(block_id)
        return hits

    # ---- allocation --------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, num_lookahead: int = 0) -> bool:
        """Make every table of `seq` cover its next `num_new_tokens` tokens, and `num_lookahead` slots
        past its last token when they reach it (draft tokens: verified, or written by a draft model);
        False if the pool cannot (no page taken; pages a window left may have been released). A
        sequence without pages first takes what the prefix cache holds, which advances
        `seq.num_computed_tokens` (the caller re-reads it)."""
        if len(seq.block_tables) != len(self.windows):
            seq.block_tables = [[] for _ in self.windows]
        fresh = not seq.block_table and seq.num_computed_tokens == 0
        hits = self.cached_prefix(seq) if fresh else []
        start = seq.num_computed_tokens + len(hits) * self.block_size
        end = min(start + num_new_tokens, seq.num_tokens)
        if end == seq.num_tokens:
            end += num_lookahead
        self._release_out_of_window(seq, start)
        need_new = [max(0, self.blocks_needed(end) - len(table)) for table in seq.block_tables]
        need_new[0] = max(0, need_new[0] - len(hits))
        cows = [] if fresh else [t for t in seq.block_tables if self._needs_copy(t, start)]
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if sum(need_new) + len(cows) > len(self.free) - revived:
            return False
        if fresh and seq.num_preemptions == 0:
            self.stats.queries += seq.num_prompt_tokens
            self.stats.hits += len(hits) * self.block_size
        if hits:
            seq.block_table = [self._take(b) for b in hits]
            seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
            seq.num_hashed_blocks = len(hits)
        for table in cows:
            self._copy_on_write(table, start // self.block_size)
        for table, n in zip(seq.block_tables, need_new):
            table.extend(self._take(self._evict()) for _ in range(n))
        return True

    def _release_out_of_window(self, seq: Sequence, first_query: int) -> None:
        """Release the pages of windowed groups that the token at `first_query` (and so every later
        one) cannot see: those wholly before position first_query - window + 1."""
        for window, table in zip(self.windows, seq.block_tables):
            if window is None:
                continue
            i = min(max(0, first_query - window + 1) // self.block_size, len(table)) - 1
            while i >= 0 and table[i] >= 0:     # pages before the last released one are released
                self._release(table[i])
                table[i] = -1
                i -= 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None

    def _needs_copy(self, table: list[int], first_write: int) -> bool:
        idx = first_write // self.block_size
        return idx < len(table) and table[idx] >= 0 and self.blocks[table[idx]].ref_count > 1

    def _copy_on_write(self, table: list[int], idx: int) -> None:
        src = table[idx]
        dst = self._take(self._evict())
        self.blocks[src].ref_count -= 1
        table[idx] = dst
        self.pending_copies.append((src, dst))

    def _evict(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids, block.parent = None, (), None
        self.free[block_id] = None      # _take removes it again
        return block_id

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
        return block_id

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.block_tables = [list(table) for table in parent.block_tables]
        child.num_hashed_blocks = parent.num_hashed_blocks
        for table in child.block_tables:
            for b in table:
                if b >= 0:
                    self.blocks[b].ref_count += 1

    def free_seq(self, seq: Sequence) -> None:
        # Tail pages first, so a prefix outlives its continuations in the LRU order.
        for table in reversed(seq.block_tables):
            for block_id in reversed(table):
                if block_id >= 0:
                    self._release(block_id)
        seq.block_tables = [[] for _ in self.windows]
        seq.num_hashed_blocks = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of pages whose tokens are now all computed (only the new ones)."""
        if not self.enable_prefix_caching:
            return
        table = seq.block_table
        num_full = min(seq.num_computed_tokens // self.block_size, len(table))
        if num_full <= seq.num_hashed_blocks:
            return
        self._update_hashes(seq, num_full)
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[table[i]]
            if block.hash is None:
                h, block.token_ids = seq.block_hashes[i]
                block.hash, block.generation = h, next(self._generations)
                block.parent = (table[i - 1], self.blocks[table[i - 1]].generation) if i else None
                self.cached.setdefault(h, block.block_id)
        seq.num_hashed_blocks = num_full

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
