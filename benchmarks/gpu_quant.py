"""tokenmill's Triton int4 and int8 products (kernels/triton_mm.py) on a GPU against the dense bfloat16 product
of the same weights dequantized (what a GPU ran before): agreement, and microseconds per call for the default
model's shapes (int4 for its Q4_1 layers, int8 for its Q8_0 lm_head) at decode (1 to 64 rows) and prefill
(512 rows) sizes, by each route: the fused kernel (weights dequantized in registers) and the weights
dequantized in one pass then cuBLAS. Times are the device's, calls replayed from a CUDA graph (`timed`), as the
engine's decode steps run; there int4_mm / int8_mm take the second route (`auto`; launched eagerly they take the
fused kernel up to FUSED_MAX_ROWS rows).
Needs CUDA; from the working tree:

  PYTHONPATH=. python benchmarks/gpu_quant.py
  TRITON_INTERPRET=1 python benchmarks/gpu_quant.py --smoke     # small shapes on the CPU: the script's own check
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import kernels  # noqa: E402
from tokenmill.kernels import triton_mm  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def timed(fn, runs: int = 20, calls: int = 10) -> float:
    """µs per call of `fn` on the device: `calls` calls recorded in one CUDA graph, the replays timed between
    events (the engine replays decode steps so: the host's launch costs are not in the figure)."""
    if not torch.cuda.is_available():           # --smoke on the CPU: the interpreter is slow
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small shapes, under TRITON_INTERPRET=1 on a CPU")
    args = ap.parse_args()
    if not (torch.cuda.is_available() or args.smoke):
        sys.exit("needs a CUDA device (or --smoke under TRITON_INTERPRET=1)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = {name: (n // 16, k) for name, (n, k) in SHAPES.items()} if args.smoke else SHAPES
    rows_list = (1, 17) if args.smoke else (1, 4, 8, 16, 32, 64, 512)
    g = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}, torch {torch.__version__}")
    print(f"calls replayed from a CUDA graph (launched eagerly, the fused kernel runs up to "
          f"{triton_mm.FUSED_MAX_ROWS} rows)\n")
    print("| layer | weights | N x K | rows | max rel. error vs bf16 dense | fused us | dequantize + cuBLAS us | "
          "bf16 dense us | auto vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in shapes.items():
        if name == "lm_head":           # Q8_0: int8 with a scale per 32 columns
            q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, k // 32, generator=g) / 500
            w = (q.view(n, k // 32, 32).float() * scale[..., None]).view(n, k).to(dev, torch.bfloat16)
            q, scale = q.to(dev), scale.to(dev)
            ours_fn, kind = (lambda x, fused=None: triton_mm.int8_mm(x, q, scale, 32, fused)), "int8"
        else:
            q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            so = torch.stack([torch.rand(n, k // 32, generator=g) / 50, torch.randn(n, k // 32, generator=g) / 50], -1)
            w = (q.view(n, k // 32, 32).float() * so[..., :1] + so[..., 1:]).view(n, k).to(dev, torch.bfloat16)
            packed, so = kernels.pack_int4(q).to(dev), so.contiguous().to(dev)
            ours_fn = lambda x, fused=None, packed=packed, so=so: triton_mm.int4_mm(x, packed, so, 32, fused)  # noqa: E731
            kind = "int4"
        for rows in rows_list:
            x = torch.randn(rows, k, generator=g).to(dev, torch.bfloat16)
            dense = torch.nn.functional.linear(x, w).float()
            try:
                error = max(((ours_fn(x, f).float() - dense).abs().max() / dense.abs().max()).item()
                            for f in (True, False))
            except Exception as e:      # a kernel that fails to build or run is a row, not the end
                print(f"| {name} | {kind} | {n} x {k} | {rows} | failed: {type(e).__name__}: {str(e)[:160]} | | | | |")
                continue
            t_fused = timed(lambda: ours_fn(x, True))
            t_deq = timed(lambda: ours_fn(x, False))
            t_dense = timed(lambda: torch.nn.functional.linear(x, w))
            t_auto = t_deq                  # what a recorded call runs
            print(f"| {name} | {kind} | {n} x {k} | {rows} | {error:.1e} | {t_fused:.1f} | {t_deq:.1f} | "
                  f"{t_dense:.1f} | {t_dense / t_auto:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
