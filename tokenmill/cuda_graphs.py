"""Decode steps replayed as CUDA graphs.

On a GPU a small model's decode step is the host launching a few hundred kernels one at a time: SmolLM2-135M
on an H200 spent 17-24 ms a step that way with the device idle (docs/benchmarks.md, "GPUs, first run"). A CUDA
graph records one step's launches and replays them all in one call.

A graph replays fixed addresses and shapes, so each graph serves one batch size (`BATCH_SIZES`, a step's rows
rounded up) and reads static inputs, filled before each replay: token ids, positions and, per KV group, slots,
context lengths and block tables as wide as the longest context the engine allows. Rows past the step's are
padding: slot -1 (nothing stored), context length 0 (no keys; their outputs are never read). The attention
metadata a graph is recorded with says every context is max_model_len long, so the decode kernel's split of the
context is fixed; splits past a sequence's end return at once. (The eager path splits by the step's longest
context, so the two sum a row's keys in another order: equal to float rounding, not bit for bit.)

Only pure decode steps run here (one query token per sequence); prefill, chunked prefill and speculative
verification run eagerly. The runner uses this where the engine runs on CUDA with the Triton attention backend
(whose kernels read only the recorded tensors), without tensor parallelism, and EngineConfig.enforce_eager is
off."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from tokenmill.attention import AttentionMetadata

if TYPE_CHECKING:
    from tokenmill.runner import Runner

logger = logging.getLogger("tokenmill")

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class Recorded:
    replay: Callable[[], None]
    output: torch.Tensor            # [batch size, hidden], rewritten by each replay


def record_cuda_graph(step: Callable[[], torch.Tensor], pool) -> Recorded:
    """Run `step` once on a side stream (Triton compiles, the allocator settles), then record it. (The int4/int8
    products take another route while a graph records (kernels/triton_mm.py), so that route's kernels first run
    inside the recording: it worked so on the H200, docs/benchmarks.md.)"""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = step()
    return Recorded(graph.replay, output)


@dataclass
class _GroupInputs:
    slots: torch.Tensor             # [max_batch] int64
    seq_lens: torch.Tensor          # [max_batch] int32
    tables: torch.Tensor            # [max_batch, pages of max_model_len] int32
    query_start_loc: torch.Tensor   # [max_batch + 1] int32: 0, 1, 2, ... (one query a row)


class DecodeGraphs:
    def __init__(self, runner: Runner, max_batch: int, max_model_len: int,
                 record: Callable[[Callable[[], torch.Tensor], object], Recorded] | None = None):
        """Graphs of `runner`'s model, caches and backend for steps of up to max_batch rows. `record`: how a step
        becomes a replayable one (default: record_cuda_graph; the tests pass one that reruns the step eagerly, to
        check the static inputs on a CPU)."""
        self.model, self.layer_caches, self.backend = runner.model, runner.layer_caches, runner.backend
        self.windows = runner.layout.group_windows
        self.layer_groups = [group for group, _ in runner.layout.layer_places]
        self.max_model_len = max_model_len
        self.sizes = [b for b in BATCH_SIZES if b < max_batch] + [max_batch]
        device = runner.device
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        pages = -(-max_model_len // runner.block_size)
        self.groups = [_GroupInputs(torch.full((max_batch,), -1, dtype=torch.long, device=device),
                                    torch.zeros(max_batch, dtype=torch.int32, device=device),
                                    torch.zeros(max_batch, pages, dtype=torch.int32, device=device),
                                    torch.arange(max_batch + 1, dtype=torch.int32, device=device))
                       for _ in self.windows]
        self.recorded: dict[int, Recorded] = {}
        self.record = record or record_cuda_graph
        self.pool = torch.cuda.graph_pool_handle() if record is None else None
        self.failed = False

    def record_all(self) -> None:
        """Record every batch size now, largest first (the smaller ones then reuse its memory pool), on the
        buffers' padding (nothing stored, no keys read), so no request pays for a recording."""
        for size in reversed(self.sizes):
            if self._record(size) is None:
                return

    def _record(self, size: int) -> Recorded | None:
        try:
            recorded = self.recorded[size] = self.record(self._step(size), self.pool)
            return recorded
        except Exception as e:          # an op of this model that a graph cannot hold: eager from now on
            self.failed = True
            logger.warning("CUDA graphs off: recording a %d-row decode step failed (%s); decode steps run "
                           "eagerly", size, e)
            return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metas: list[AttentionMetadata]) -> torch.Tensor | None:
        """The step's final hidden states [T, hidden] from a replay, or None where it is not a pure decode step
        of at most max_batch rows (the caller runs it eagerly)."""
        n = input_ids.shape[0]
        if (self.failed or n > self.sizes[-1] or not all(m.is_pure_decode for m in metas)
                or any(m.block_tables.shape[1] > g.tables.shape[1] for m, g in zip(metas, self.groups))):
            return None
        size = next(b for b in self.sizes if b >= n)
        self._fill(n, size, input_ids, positions, metas)
        recorded = self.recorded.get(size) or self._record(size)
        if recorded is None:
            return None
        recorded.replay()
        return recorded.output[:n]

    def _fill(self, n: int, size: int, input_ids: torch.Tensor, positions: torch.Tensor,
              metas: list[AttentionMetadata]) -> None:
        self.ids[:n].copy_(input_ids)
        self.ids[n:size].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:size].zero_()
        for inputs, meta in zip(self.groups, metas):
            width = meta.block_tables.shape[1]
            inputs.slots[:n].copy_(meta.slot_mapping)
            inputs.slots[n:size].fill_(-1)
            inputs.seq_lens[:n].copy_(meta.seq_lens)
            inputs.seq_lens[n:size].zero_()
            inputs.tables[:n, :width].copy_(meta.block_tables)   # entries past a row's pages are never read

    def _step(self, size: int) -> Callable[[], torch.Tensor]:
        metas = [AttentionMetadata(slot_mapping=g.slots[:size], query_start_loc=g.query_start_loc[:size + 1],
                                   seq_lens=g.seq_lens[:size], block_tables=g.tables[:size],
                                   query_lens_list=[1] * size, seq_lens_list=[self.max_model_len] * size,
                                   sliding_window=window)
                 for g, window in zip(self.groups, self.windows)]
        layer_metas = [metas[group] for group in self.layer_groups]
        return lambda: self.model(self.ids[:size], self.positions[:size], self.layer_caches, self.backend,
                                  layer_metas)
