"""Decode attention over float32 against float16 KV pages (kv_cache_dtype), as a decode step meets them:
tokenmill's paged_decode kernel over `--layers` distinct caches, so the pages come from DRAM as in the engine
(one layer's cache alone fits the L3 cache and flatters both). SmolLM2-135M's shapes: 9 query heads, 3 KV
heads, head_dim 64, 16-token pages in shuffled order. The two dtypes alternate round by round; medians.

  python benchmarks/kv_pages.py [--rows 64] [--context 192] [--layers 30] [--rounds 9]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantization import machine  # noqa: E402
from tokenmill import kernels  # noqa: E402

HQ, HKV, D, PAGE = 9, 3, 64, 16


def setup(rows: int, context: int, layers: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = -(-context // PAGE)
    pages = rows * width
    tables = torch.randperm(pages, generator=g).to(torch.int32).view(rows, width).contiguous()
    q, k, v = (torch.randn(rows, h, D, generator=g) for h in (HQ, HKV, HKV))
    lens = torch.full((rows,), context, dtype=torch.int32)
    starts = torch.zeros(rows, dtype=torch.int32)
    slots = tables[:, (context - 1) // PAGE].long() * PAGE + (context - 1) % PAGE
    caches = [tuple(torch.randn(pages, PAGE, HKV, D, generator=g).to(dtype) for _ in range(2)) for _ in range(layers)]
    return q, k, v, slots, caches, tables, lens, starts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if kernels.library() is None:
        raise SystemExit("tokenmill's CPU kernels are not available here")
    dtypes = (torch.float32, torch.float16)
    cases = {dt: setup(args.rows, args.context, args.layers, dt) for dt in dtypes}
    times: dict[torch.dtype, list[float]] = {dt: [] for dt in dtypes}
    for r in range(args.rounds):
        print(f"[round {r + 1} of {args.rounds}]", file=sys.stderr)
        for dt, (q, k, v, slots, caches, tables, lens, starts) in cases.items():
            start = time.perf_counter()
            for kc, vc in caches:
                kernels.paged_decode(q, k, v, slots, kc, vc, tables, lens, starts, D ** -0.5)
            times[dt].append(time.perf_counter() - start)
    print(f"\nmachine: {machine()}")
    print(f"{args.rows} rows x {args.context} keys, {args.layers} layers' caches, {HQ}/{HKV} heads, head_dim {D}; "
          f"median of {args.rounds} alternating rounds\n")
    print("| pages | KV MB read per step | ms per step | GB/s | vs float32 |")
    print("|---|---|---|---|---|")
    base = statistics.median(times[torch.float32])
    for dt in dtypes:
        ms = statistics.median(times[dt])
        mb = 2 * args.layers * args.rows * args.context * HKV * D * torch.empty((), dtype=dt).element_size() / 1e6
        print(f"| {str(dt).removeprefix('torch.')} | {mb:.0f} | {1000 * ms:.1f} | {mb / 1000 / ms:.1f} | "
              f"{base / ms:.2f}x |")


if __name__ == "__main__":
    main()
