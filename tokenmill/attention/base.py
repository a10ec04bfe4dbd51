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
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor         # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor     # [num_seqs, max_blocks_per_seq] int32, padded with 0
    query_lens_list: list[int]
    seq_lens_list: list[int]

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
              device: torch.device | str = "cpu", table_rows: list[torch.Tensor] | None = None
              ) -> "AttentionMetadata":
        """From per-sequence page lists: sequence b's new tokens are the last query_lens[b] of its
        seq_lens[b] positions; their slots follow from its pages, the tables are padded with 0.
        `table_rows` (int32 tensors equal to the page lists) spares converting whole lists."""
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
                   query_lens_list=list(query_lens), seq_lens_list=list(seq_lens))

    def to(self, device: torch.device | str) -> "AttentionMetadata":
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            query_start_loc=self.query_start_loc.to(device),
            seq_lens=self.seq_lens.to(device),
            block_tables=self.block_tables.to(device),
            query_lens_list=self.query_lens_list,
            seq_lens_list=self.seq_lens_list,
        )


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter k/v [num_tokens, num_kv_heads, head_dim] into caches
    [num_blocks, block_size, num_kv_heads, head_dim] at `slot_mapping`."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's first `seq_len` cached rows: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    pages = cache.index_select(0, block_table[:num_blocks].long())
    return pages.reshape(-1, *cache.shape[2:])[:seq_len]


class AttentionBackend(ABC):
    name: str = ""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], caches [num_blocks, block_size, Hkv, D] -> [T, Hq, D]."""
