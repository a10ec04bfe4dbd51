"""Random paged attention inputs, shared by the attention tests and benchmarks."""
from __future__ import annotations

import torch

from tokenmill.attention.base import AttentionMetadata


def random_paged_case(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      block_size: int = 16, spare_blocks: int = 0, seed: int = 0):
    """q/k/v for the new tokens and K/V caches already filled with random earlier context, every
    sequence's pages scattered over the cache in shuffled order (plus `spare_blocks` unused pages).
    Returns q [T, Hq, D], k, v [T, Hkv, D], k_cache, v_cache [blocks, block_size, Hkv, D], metadata."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(pages) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, i = [], 0
    for n in pages:
        tables.append(perm[i:i + n])
        i += n
    meta = AttentionMetadata.build(tables, query_lens, seq_lens, block_size, device)
    # drawn on the device: caches for long contexts reach GiBs
    gd = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gd, device=device).to(dtype)

    t = sum(query_lens)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (rand(t, num_heads, head_dim), rand(t, num_kv_heads, head_dim), rand(t, num_kv_heads, head_dim),
            rand(*cache_shape), rand(*cache_shape), meta)
