"""The attention backend interface and the per-step metadata every backend reads.

Contract of `AttentionBackend.forward`:
  1. write this step's new keys/values into the paged cache at `slot_mapping`
     (slot = block_id * block_size + offset; a slot of -1 is skipped);
  2. for every sequence b, its query tokens are the last `query_len_b` of its
     `seq_len_b` context tokens; query token i (0-based inside the chunk) attends to
     context positions 0 .. seq_len_b - query_len_b + i (causal), read from the cache
     through `block_tables[b]`;
  3. return the attention output, one row per query token, in the order of `q`.
K/V heads are shared by `num_q_heads // num_kv_heads` query heads (MHA, GQA, MQA).

Sliding window (`meta.sliding_window` = W, None: unbounded): a query token at absolute position p
attends only to context positions max(0, p - W + 1) .. p, the last W positions including its own
(key j is visible iff j <= p and p - j < W: Hugging Face's and llama.cpp's rule for Gemma 3 and
Mistral). The engine releases pages that slid out of the window, so in `block_tables[b]` the
entries with index < max(0, first_query_pos - W + 1) // block_size, where first_query_pos =
seq_len_b - query_len_b, may hold -1 or a stale page id: a backend never reads those entries (no
gather, no load), and its result does not depend on them (`window_start`, `first_page`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor         # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor     # [num_seqs, max_blocks_per_seq] int32, padded with 0
    query_lens_list: list[int]
    seq_lens_list: list[int]
    sliding_window: int | None = None   # W: each query sees its last W positions; None: all of them
    # what a backend derives from the metadata once per step and every layer reuses (e.g. the pages a
    # decode step gathers); never sent anywhere: `to()` and `dataclasses.replace` start it empty
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens or None, got {self.sliding_window}")

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_list, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list, default=0)

    @property
    def is_pure_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens_list)

    @classmethod
    def build(cls, block_tables: list[list[int]], query_lens: list[int], seq_lens: list[int], block_size: int,
              device: torch.device | str = "cpu", table_rows: list[torch.Tensor] | None = None,
              sliding_window: int | None = None) -> "AttentionMetadata":
        """From per-sequence page lists: sequence b's new tokens are the last query_lens[b] of its
        seq_lens[b] positions; their slots follow from its pages, the tables are padded with 0.
        `table_rows` (int32 tensors equal to the page lists) spares converting whole lists.
        With `sliding_window` the entries of pages released before the window may be -1."""
        slots: list[int] = []
        for table, qlen, slen in zip(block_tables, query_lens, seq_lens):
            slots += [table[p // block_size] * block_size + p % block_size for p in range(slen - qlen, slen)]
        if table_rows is None:
            table_rows = [torch.tensor(t, dtype=torch.int32) for t in block_tables]
        cu = [0]
        for qlen in query_lens:
            cu.append(cu[-1] + qlen)
        return cls(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
                   query_start_loc=torch.tensor(cu, dtype=torch.int32, device=device),
                   seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                   block_tables=torch.nn.utils.rnn.pad_sequence(table_rows, batch_first=True).to(device),
                   query_lens_list=list(query_lens), seq_lens_list=list(seq_lens), sliding_window=sliding_window)

    def to(self, device: torch.device | str) -> "AttentionMetadata":
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            query_start_loc=self.query_start_loc.to(device),
            seq_lens=self.seq_lens.to(device),
            block_tables=self.block_tables.to(device),
            query_lens_list=self.query_lens_list,
            seq_lens_list=self.seq_lens_list,
            sliding_window=self.sliding_window,
        )


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Scatter k/v [num_tokens, num_kv_heads, head_dim] into caches
    [num_blocks, block_size, num_kv_heads, head_dim] at `meta.slot_mapping` (slots of -1 skipped)."""
    slot_mapping = meta.slot_mapping
    if "slot_keep_mask" not in meta.derived:
        keep = slot_mapping >= 0
        meta.derived["slot_keep_mask"] = None if bool(keep.all()) else keep
    keep = meta.derived["slot_keep_mask"]
    if keep is not None:
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def window_start(seq_len: int, query_len: int, window: int | None) -> int:
    """The first context position any of a sequence's `query_len` queries sees (0 without a window)."""
    return 0 if window is None else max(0, seq_len - query_len - window + 1)


def first_page(seq_len: int, query_len: int, window: int | None, block_size: int) -> int:
    """Index of the first block-table entry a backend may read; the entries before it may be released."""
    return window_start(seq_len, query_len, window) // block_size


def window_mask(q_first: int, num_q: int, k_first: int, num_k: int, window: int) -> torch.Tensor:
    """[num_q, num_k] bool, True where the query at position q_first + i sees the key at k_first + j."""
    dist = torch.arange(q_first, q_first + num_q).unsqueeze(1) - torch.arange(k_first, k_first + num_k)
    return (dist >= 0) & (dist < window)


def window_tiles(seq_len: int, query_len: int, window: int, rows: int):
    """Split a chunk under a window into query tiles of at most `rows`, each with the keys it sees, so a
    mask costs rows x (rows + window) rather than query_len x seq_len. Yields (i0, i1, k0, k1): queries
    i0 .. i1 - 1 of the chunk see context positions k0 .. k1 - 1 (under window_mask)."""
    first_pos = seq_len - query_len
    for i0 in range(0, query_len, rows):
        i1 = min(query_len, i0 + rows)
        yield i0, i1, max(0, first_pos + i0 - window + 1), first_pos + i1


def decode_window_tables(block_tables: torch.Tensor, seq_lens: list[int], window: int,
                         block_size: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """Decode rows (one query each, at its last position) under a window: every row's table entries from
    its first page on, [B, width], width being the most pages a row needs; a shorter row runs on into
    its own later entries or the tables' 0 padding (pages to be masked, never released ones). Also each
    row's first page and its number of pages in use."""
    first = [max(0, n - window) // block_size for n in seq_lens]
    pages = [-(-n // block_size) - f for n, f in zip(seq_lens, first)]
    cols = torch.tensor(first).unsqueeze(1) + torch.arange(max(pages))                 # [B, width]
    cols = cols.clamp_(max=block_tables.shape[1] - 1).to(block_tables.device)
    return block_tables.gather(1, cols), first, pages


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, from_page: int = 0,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """One sequence's cached rows from page `from_page` up to position `seq_len`:
    [seq_len - from_page * block_size, num_kv_heads, head_dim], in `dtype` (default: the cache's; pages
    may be stored narrower than the queries that read them); the entries before `from_page` are never
    read, so pages released by a sliding window may hold anything."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    pages = cache.index_select(0, block_table[from_page:num_blocks].long())
    return pages.reshape(-1, *cache.shape[2:])[:seq_len - from_page * block_size].to(dtype or cache.dtype)


class AttentionBackend(ABC):
    name: str = ""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], caches [num_blocks, block_size, Hkv, D] -> [T, Hq, D]."""

    def decode_tables(self, meta: AttentionMetadata, num_heads: int, dtype: torch.dtype,
                      k_cache: torch.Tensor) -> tuple | None:
        """Where this step's attention would be tokenmill's CPU decode kernel (kernels.paged_decode), its
        (slots, block_tables, seq_lens, starts): the caller may then run the kernel itself
        (kernels.DecoderStack). None otherwise."""
        return None
