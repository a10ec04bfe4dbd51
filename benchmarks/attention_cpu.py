"""Which CPU attention backend is fastest here: every registered CPU backend on SmolLM2-135M's shapes
(9 query heads, 3 KV heads, head_dim 64, fp32, 16-token pages, pages shuffled in the cache).

  prefill   one prompt of N tokens, nothing cached
  chunked   a 512-token chunk after N - 512 cached tokens (an earlier chunk or a prefix-cache hit)
  decode    B sequences, one new token each, contexts drawn from [ctx / 2, ctx]
  window W  the same under a sliding window of W tokens (Gemma 3, Mistral)
Time: the fastest of --repeats calls (the machine is shared; the minimum is the least disturbed).

  python benchmarks/attention_cpu.py [--threads 2] [--backends torch cpu] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.attention import get_backend  # noqa: E402
from tokenmill.attention.testing import random_paged_case  # noqa: E402

HQ, HKV, D, PAGE = 9, 3, 64, 16


def paged_case(query_lens: list[int], seq_lens: list[int], seed: int = 0, window: int | None = None):
    *tensors, meta = random_paged_case(query_lens, seq_lens, HQ, HKV, D, block_size=PAGE, seed=seed)
    return (*tensors, dataclasses.replace(meta, sliding_window=window))


def best_ms(backends: list, case, repeats: int) -> list[float]:
    """Fastest of `repeats` calls per backend, the backends interleaved so that load from other
    processes falls on all of them alike."""
    q, k, v, kc, vc, meta = case
    times = [[] for _ in backends]
    for r in range(repeats + 1):
        for backend, ts in zip(backends, times):
            t = time.perf_counter()
            backend.forward(q, k, v, kc, vc, meta, D ** -0.5)
            if r:                                   # the first call warms the workspace and caches
                ts.append(time.perf_counter() - t)
    return [1000 * min(ts) for ts in times]


def cases(quick: bool):
    rng = random.Random(0)
    for n in (128, 512) if quick else (128, 512, 2048, 8192):
        yield f"prefill N={n}", [n], [n]
    for n in (1024,) if quick else (1024, 2048, 8192):
        yield f"chunk 512 after {n - 512} cached", [512], [n]
    for batch in (1, 8) if quick else (1, 8, 64):
        for ctx in (128, 1024) if quick else (128, 1024, 4096):
            lens = [ctx] if batch == 1 else [rng.randint(ctx // 2, ctx) for _ in range(batch)]
            yield f"decode B={batch} ctx<={ctx}", [1] * batch, lens
    yield "mixed: chunk 256 after 768 + 16 decodes ctx<=1024", [256] + [1] * 16, [1024] + [
        rng.randint(512, 1024) for _ in range(16)]
    n, ctx, window = (512, 1024, 128) if quick else (2048, 4096, 512)
    yield f"prefill N={n}, window {window}", [n], [n], window
    yield f"decode B=8 ctx<={ctx}, window {window}", [1] * 8, [rng.randint(ctx // 2, ctx) for _ in range(8)], window


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backends = {name: get_backend(name) for name in args.backends}
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per call (best of {args.repeats})\n")
    print("| case | " + " | ".join(args.backends) + f" | {args.backends[-1]} vs {args.backends[0]} |")
    print("|---|" + "---|" * (len(args.backends) + 1))
    for name, query_lens, seq_lens, *window in cases(args.quick):
        case = paged_case(query_lens, seq_lens, window=window[0] if window else None)
        ms = best_ms(list(backends.values()), case, args.repeats)
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in ms) + f" | {ms[0] / ms[-1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
