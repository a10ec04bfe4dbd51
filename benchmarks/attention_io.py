"""Naive versus tiled (IO-aware) causal attention on this CPU, N = 512 ... 16k.

For one head group of SmolLM2's shape (9 query heads sharing 3 KV heads, head_dim 64, fp32):
  bytes   main-memory traffic counted from each kernel's tiling (see `naive_bytes` / `tiled_bytes`)
  peak    peak resident memory of a fresh process that runs one call (ru_maxrss minus the baseline)
  time    median wall time of the call
naive = attention/reference.py's dense math (writes the N x N scores and probabilities);
tiled = the engine's CPU path, ATen's flash kernel (`is_causal`, online softmax, no N x N).

  python benchmarks/attention_io.py [--max-n 16384] [--png docs/attention_io.png]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HQ, HKV, D, ELEM = 9, 3, 64, 4
Q_TILE = 256          # ATen's CPU flash kernel: q_split_size for N >= 768 (kv_split_size 512)


def naive_bytes(n: int) -> int:
    # S = QK^T: read Q, K, write S;  P = softmax(S): read S, write P;  O = PV: read P, V, write O
    per_head = (2 * n * D + n * n) + (2 * n * n) + (n * n + n * D + n * D)
    return HQ * per_head * ELEM


def tiled_bytes(n: int) -> int:
    # Q read once, O written once; K and V streamed once per query tile, only up to the diagonal
    tiles = -(-n // Q_TILE)
    kv_rows = sum(min(n, (t + 1) * Q_TILE) for t in range(tiles))
    return HQ * (2 * n * D + 2 * kv_rows * D) * ELEM


def one_call(impl: str, n: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tokenmill.attention.reference import dense_causal_attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, HQ, D, generator=g)
    k = torch.randn(n, HKV, D, generator=g)
    v = torch.randn(n, HKV, D, generator=g)
    if impl == "naive":
        def run():
            return dense_causal_attention(q, k, v, D ** -0.5)
    else:
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]   # 4-D: flash path

        def run():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"seconds": statistics.median(times), "peak_mib": peak / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-n", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--png", default=None)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_call(args.child[0], int(args.child[1]), args.repeats)))
        return
    sizes = [n for n in (512, 1024, 2048, 4096, 8192, 16384) if n <= args.max_n]
    rows = []
    print("| N | naive MiB moved | tiled MiB moved | naive peak MiB | tiled peak MiB | naive ms | tiled ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        r = {"n": n, "naive_bytes": naive_bytes(n), "tiled_bytes": tiled_bytes(n)}
        for impl in ("naive", "tiled"):
            print(f"[attention_io] {impl} N={n}", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--child", impl, str(n)],
                                 capture_output=True, text=True, check=True)
            res = json.loads(out.stdout)
            r[f"{impl}_seconds"], r[f"{impl}_peak_mib"] = res["seconds"], res["peak_mib"]
        rows.append(r)
        mib = 1 << 20
        print(f"| {n} | {r['naive_bytes'] / mib:.0f} | {r['tiled_bytes'] / mib:.1f} | {r['naive_peak_mib']:.0f} | "
              f"{r['tiled_peak_mib']:.0f} | {1000 * r['naive_seconds']:.1f} | {1000 * r['tiled_seconds']:.1f} | "
              f"{r['naive_seconds'] / r['tiled_seconds']:.1f}x |", flush=True)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        ns = [r["n"] for r in rows]
        for ax, key, label in ((axes[0], "bytes", "main-memory traffic (MiB)"),
                               (axes[1], "peak_mib", "peak memory (MiB)"), (axes[2], "seconds", "time (s)")):
            for impl, style in (("naive", "o-"), ("tiled", "s-")):
                vals = [r[f"{impl}_{key}"] / ((1 << 20) if key == "bytes" else 1) for r in rows]
                ax.plot(ns, vals, style, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_title(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("causal attention, 9 query / 3 KV heads, head_dim 64, fp32, this CPU")
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
