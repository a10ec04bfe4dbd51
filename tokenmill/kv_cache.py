"""The physical KV pages: one (key, value) pair of [num_blocks, block_size, num_kv_heads, head_dim]
tensors per layer, and how many pages a memory budget buys."""
from __future__ import annotations

import torch

from tokenmill.model.config import ModelConfig


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def num_blocks_for_memory(cfg: ModelConfig, block_size: int, dtype: torch.dtype, memory_gb: float,
                          extra_bytes_per_block: int = 0) -> int:
    """Pages the budget buys; `extra_bytes_per_block`: another cache over the same pages (a draft model's)."""
    return int(memory_gb * (1 << 30)) // (bytes_per_block(cfg, block_size, dtype) + extra_bytes_per_block)


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)]


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]]) -> None:
    if not copies:
        return
    src = torch.tensor([s for s, _ in copies], device=kv_caches[0][0].device)
    dst = torch.tensor([d for _, d in copies], device=kv_caches[0][0].device)
    for k, v in kv_caches:
        k[dst] = k[src]
        v[dst] = v[src]
