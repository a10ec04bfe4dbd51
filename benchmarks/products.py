"""tokenmill's CPU products (kernels/cpu.c) against PyTorch's dense float32 product of the same shapes: GOP/s at
batch 1, a decode batch and a prefill chunk, on the default model's linear shapes (N x K).

  int4:  kernels.int4_mm, weights in tile_int4's tiles, activations rounded to int8 per 32 columns inside
  int8:  kernels.int8_mm, weights in tile_int8's tiles, activations rounded to int8 per 32 columns inside
  f32:   torch.nn.functional.linear on float32 weights (what a dequantized checkpoint runs)
Each figure is the median of --repeats calls (activation rounding included), the three run back to back.
--builds avx2,vnni: the int4 and int8 columns for each build of cpu.c (kernels.BUILDS), their calls alternating
(on a CPU with AVX-512 VNNI; the f32 column once).

python benchmarks/products.py [--rows 1,64,2048] [--repeats 20] [--builds avx2,vnni]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantization import machine  # noqa: E402
from tokenmill import kernels  # noqa: E402

SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)}


def median_seconds(fns: list, repeats: int) -> list[float]:
    """Each function's median time over `repeats` rounds, one call of each per round (alternating)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,64,2048")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--builds", default=None, help="builds of cpu.c to compare, e.g. avx2,vnni (default: the loaded one)")
    args = ap.parse_args()
    if kernels.library() is None:
        raise SystemExit("tokenmill's CPU kernels do not run here (no AVX2/FMA or no C compiler)")
    builds = args.builds.split(",") if args.builds else [kernels.build()]
    libs = [kernels.compiled(b) for b in builds]
    g = torch.Generator().manual_seed(0)
    print(f"machine: {machine()}\n")
    cols = [f"{bits} GOP/s ({b})" for b in builds for bits in ("int4", "int8")]
    print(f"| shape (N x K) | rows | {' | '.join(cols)} | f32 GFLOP/s | int4 / f32 ({builds[-1]}) |")
    print("|---|---|" + "---|" * (len(cols) + 2))
    for name, (n, k) in SHAPES.items():
        q4 = kernels.tile_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                               torch.rand(n, k // 32, generator=g) / 100, torch.randn(n, k // 32, generator=g) / 100)
        q8 = kernels.tile_int8(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                               torch.rand(n, k // 32, generator=g) / 100)
        w = torch.randn(n, k, generator=g)
        for m in (int(r) for r in args.rows.split(",")):
            if name.startswith("lm_head") and m > 64:      # it runs on a prompt's last rows only
                continue
            x = torch.randn(m, k, generator=g)
            print(f"[{name}, {m} rows]", file=sys.stderr)
            fns = [f for lib in libs for f in (lambda lib=lib: kernels.int4_mm(x, *q4, n, 32, lib=lib),
                                               lambda lib=lib: kernels.int8_mm(x, *q8, n, 32, lib=lib))]
            *ts, tf = median_seconds(fns + [lambda: F.linear(x, w)], args.repeats)
            ops = 2 * m * n * k / 1e9
            print(f"| {name} | {m} | {' | '.join(f'{ops / t:.0f}' for t in ts)} | {ops / tf:.0f} | "
                  f"{tf / ts[-2]:.2f}x |")


if __name__ == "__main__":
    main()
