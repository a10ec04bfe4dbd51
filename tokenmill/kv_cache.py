"""The physical KV pages and how layers share them.

Layers are grouped by attention window ("KV groups"): every group has its own block table per
sequence, so a sliding-window group can release the pages that fell out of its window while a
full-attention group keeps them. All groups draw page ids from one pool, so memory flows to
whichever group needs it; for that, a page must cost the same in every group: groups have the
same number of layers (gcd of the per-window layer counts), and layer slot s of every group lives
in the same tensor pair. Page p of slot s is `kv_caches[s][0|1][p]`, whichever group owns p.

    Gemma 3 270M (18 layers: 3 global, 15 local with window 512) -> 6 groups of 3 layers:
      group 0 (full)  layers 5 11 17       one table per sequence, pages 0..L/16
      group 1 (512)   layers 0  1  2       one table each, at most ~33 live pages
      ...
      group 5 (512)   layers 14 15 16
      slot tensors:   [pages, 16, Hkv, D] x 3  (layer 5 -> slot 0 with group 0's table, ...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenmill.model.config import ModelConfig
from tokenmill.parallel.comm import local_kv_heads


@dataclass(frozen=True)
class KVLayout:
    group_windows: tuple[int | None, ...]     # per group: its window (None = full attention)
    layer_places: tuple[tuple[int, int], ...]  # per layer: (group, slot)

    @classmethod
    def of(cls, windows: list[int | None]) -> "KVLayout":
        by_window: dict[int | None, list[int]] = {}
        for layer, window in enumerate(windows):
            by_window.setdefault(window, []).append(layer)
        size = math.gcd(*(len(layers) for layers in by_window.values()))
        groups: list[int | None] = []
        places: list[tuple[int, int]] = [(0, 0)] * len(windows)
        # full attention first: group 0 is the one the prefix cache and a draft model use
        for window in sorted(by_window, key=lambda w: -1 if w is None else w):
            layers = by_window[window]
            for i in range(0, len(layers), size):
                for slot, layer in enumerate(layers[i:i + size]):
                    places[layer] = (len(groups), slot)
                groups.append(window)
        return cls(tuple(groups), tuple(places))

    @property
    def num_slots(self) -> int:
        return 1 + max(slot for _, slot in self.layer_places)


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, num_slots: int, tp: int = 1) -> int:
    """Bytes of one page id on one rank (of `tp`, each holding its KV heads): one page of every slot."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_slots * block_size * local_kv_heads(cfg.num_key_value_heads, tp) * cfg.head_dim * elem


def num_blocks_for_memory(cfg: ModelConfig, block_size: int, dtype: torch.dtype, memory_gb: float, num_slots: int,
                          extra_bytes_per_block: int = 0, tp: int = 1) -> int:
    """Pages the budget (per rank) buys; `extra_bytes_per_block`: another cache over the same pages (a
    draft model's)."""
    return int(memory_gb * (1 << 30)) // (bytes_per_block(cfg, block_size, dtype, num_slots, tp) + extra_bytes_per_block)


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device, num_slots: int, tp: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (key, value) pair of [num_blocks, block_size, num_kv_heads, head_dim] tensors per slot (a
    draft model, whose layers all follow the target's group 0, has a slot per layer); under tensor
    parallelism num_kv_heads is this rank's."""
    shape = (num_blocks, block_size, local_kv_heads(cfg.num_key_value_heads, tp), cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_slots)]


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]]) -> None:
    """Copy pages in every slot: a page id belongs to one group at a time, so this is its copy."""
    if not copies:
        return
    src = torch.tensor([s for s, _ in copies], device=kv_caches[0][0].device)
    dst = torch.tensor([d for _, d in copies], device=kv_caches[0][0].device)
    for k, v in kv_caches:
        k[dst] = k[src]
        v[dst] = v[src]
