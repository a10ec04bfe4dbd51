"""tokenmill's Triton int4 and int8 products (kernels/triton_mm.py) on a GPU against the dense bfloat16 product
of the same weights dequantized (what a GPU ran before): agreement, and microseconds per call for the default
model's shapes (int4 for its Q4_1 layers, int8 for its Q8_0 lm_head) at decode (1, 16, 64 rows) and prefill
(512 rows) sizes. Needs CUDA; from the working tree:

  PYTHONPATH=. python benchmarks/gpu_quant.py
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import kernels  # noqa: E402
from tokenmill.kernels import triton_mm  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def timed(fn, runs: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| layer | weights | N x K | rows | max rel. error vs bf16 dense | ours us | bf16 dense us | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        if name == "lm_head":           # Q8_0: int8 with a scale per 32 columns
            q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, k // 32, generator=g) / 500
            w = (q.view(n, k // 32, 32).float() * scale[..., None]).view(n, k).to(dev, torch.bfloat16)
            q, scale = q.to(dev), scale.to(dev)
            ours_fn, kind = (lambda x: triton_mm.int8_mm(x, q, scale, 32)), "int8"
        else:
            q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            so = torch.stack([torch.rand(n, k // 32, generator=g) / 50, torch.randn(n, k // 32, generator=g) / 50], -1)
            w = (q.view(n, k // 32, 32).float() * so[..., :1] + so[..., 1:]).view(n, k).to(dev, torch.bfloat16)
            packed, so = kernels.pack_int4(q).to(dev), so.contiguous().to(dev)
            ours_fn, kind = (lambda x, packed=packed, so=so: triton_mm.int4_mm(x, packed, so, 32)), "int4"
        for rows in (1, 16, 64, 512):
            x = torch.randn(rows, k, generator=g).to(dev, torch.bfloat16)
            try:
                ours = ours_fn(x).float()
            except Exception as e:      # a kernel that fails to build or run is a row, not the end
                print(f"| {name} | {kind} | {n} x {k} | {rows} | failed: {type(e).__name__}: {str(e)[:160]} | | | |")
                continue
            dense = torch.nn.functional.linear(x, w).float()
            error = ((ours - dense).abs().max() / dense.abs().max()).item()
            t_ours = timed(lambda: ours_fn(x))
            t_dense = timed(lambda: torch.nn.functional.linear(x, w))
            print(f"| {name} | {kind} | {n} x {k} | {rows} | {error:.1e} | {t_ours:.1f} | {t_dense:.1f} | "
                  f"{t_dense / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
