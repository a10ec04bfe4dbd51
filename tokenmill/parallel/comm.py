"""The tensor-parallel group as the model sees it, and how a checkpoint matrix is cut between ranks.

Megatron's split, as vLLM and gpt-fast do it:
  Q/K/V, gate/up   column-parallel: each rank holds a slice of the output rows (its heads, its part of
                   the intermediate size); no communication
  o, down          row-parallel: each rank holds the matching input columns; partial sums, one all-reduce
  embedding        vocabulary-parallel rows: a rank looks up the ids it holds, zeros elsewhere, one all-reduce
  lm_head          vocabulary-parallel rows: logits gathered once, on rank 0, for the sampler
KV heads follow their query heads; with more ranks than KV heads each KV head is replicated on
tensor_parallel_size / num_kv_heads ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This rank's piece of a checkpoint tensor: piece `index` of `count` along `dim` (0: output rows,
    1: input columns). Pieces are ceil(n / count) long; the last may be shorter (a vocabulary)."""
    dim: int
    index: int = 0
    count: int = 1

    def bounds(self, n: int) -> tuple[int, int]:
        size = -(-n // self.count)
        start = min(n, self.index * size)
        return start, min(n, start + size)

    def length(self, n: int) -> int:
        start, end = self.bounds(n)
        return end - start


@dataclass(frozen=True)
class TPGroup:
    """rank of size ranks; `group` is the process group of the per-layer collectives (None at size 1)."""
    rank: int = 0
    size: int = 1
    group: Any = None

    def rows(self, count: int | None = None) -> Shard:
        """Column-parallel: this rank's rows of a matrix split `count` ways (default: by every rank)."""
        count = count or self.size
        return Shard(0, self.rank * count // self.size, count)

    def columns(self) -> Shard:
        """Row-parallel: this rank's input columns."""
        return Shard(1, self.rank, self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x (in place when x is contiguous)."""
        if self.size > 1:
            x = x.contiguous()
            dist.all_reduce(x, group=self.group)
        return x

    def gather_columns(self, x: torch.Tensor, total: int) -> torch.Tensor | None:
        """Rank 0: every rank's x [N, piece] side by side, cut to `total` columns; other ranks: None.
        Pieces are padded to the longest one, the equal sizes `gather` needs."""
        if self.size == 1:
            return x
        piece = -(-total // self.size)
        if x.shape[-1] < piece:
            x = torch.nn.functional.pad(x, (0, piece - x.shape[-1]))
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, out, dst=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                    group=self.group)
        return torch.cat(out, dim=-1)[..., :total] if out is not None else None


SINGLE = TPGroup()


def kv_shards(num_kv_heads: int, tp: int) -> int:
    """Pieces the KV heads are cut into: one per rank, or one per head when heads are replicated."""
    return min(num_kv_heads, tp)


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    return num_kv_heads // kv_shards(num_kv_heads, tp)


def check_tensor_parallel(cfg, tp: int, name: str = "tensor_parallel_size") -> None:
    """Every split the model needs is even, or a ValueError that says which one is not."""
    if tp == 1:
        return
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % tp:
        raise ValueError(f"{name} {tp}: the model's {heads} attention heads do not split evenly over {tp} ranks; "
                         f"use a size that divides {heads}")
    if kv >= tp and kv % tp:
        raise ValueError(f"{name} {tp}: the model's {kv} KV heads do not split evenly over {tp} ranks; "
                         f"use a size that divides {kv}")
    if kv < tp and tp % kv:
        raise ValueError(f"{name} {tp}: the model's {kv} KV heads cannot be replicated evenly on {tp} ranks; "
                         f"use a multiple of {kv}")
    if cfg.intermediate_size % tp:
        raise ValueError(f"{name} {tp}: the model's intermediate_size {cfg.intermediate_size} does not split "
                         f"evenly over {tp} ranks")
