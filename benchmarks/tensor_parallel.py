"""Tensor parallelism on this machine: decode step time at batch 1 and 64 for each tensor_parallel_size,
the part of it rank 0 spends inside collectives (all-reduces, the logits gather, the step broadcast;
waiting for the slowest rank included), start-up time and memory per rank.

  python benchmarks/tensor_parallel.py [--model smollm2-135m] [--tp 1,3] [--batches 1,64] [--steps 24]

SmolLM2 (9 heads, 3 KV heads) splits 3 ways, Gemma 3 270M (4 heads, 1 KV head) 2 or 4 ways. Each size
runs in this process, one after the other; ranks > 0 are separate processes.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.engine import LLMEngine  # noqa: E402
from tokenmill.model.load import weight_bytes  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402


def machine() -> str:
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor())
    feats = [f for f in ("avx2", "avx512", "avx512_bf16", "amx_tile") if
             getattr(torch.cpu, f"_is_{f}_supported", lambda: False)()]
    return f"{name}, {os.cpu_count()} cores, features {'/'.join(feats) or 'avx2 only'}, torch {torch.__version__}"


class CollectiveClock:
    """Seconds rank 0 spends inside torch.distributed calls (patched in for the run)."""

    NAMES = ("all_reduce", "gather", "broadcast_object_list")

    def __init__(self):
        self.seconds = 0.0
        self.real = {n: getattr(dist, n) for n in self.NAMES}

    def __enter__(self):
        for name, fn in self.real.items():
            def timed(*a, _fn=fn, **kw):
                t = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    self.seconds += time.perf_counter() - t
            setattr(dist, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self.real.items():
            setattr(dist, name, fn)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def decode_steps(engine: LLMEngine, batch: int, steps: int) -> tuple[float, float]:
    """Median decode step ms with `batch` sequences running, and median ms of it inside collectives."""
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        engine.add_request(None, [(7 * i + j) % (vocab - 10) + 10 for j in range(32)], params)
    while engine.scheduler.waiting or any(s.in_prompt for s in engine.scheduler.running):
        engine.step()
    times, comm = [], []
    for _ in range(steps):
        with CollectiveClock() as clock:
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        comm.append(clock.seconds)
    for rid in list(engine.requests):
        engine.abort_request(rid)
    return statistics.median(times) * 1e3, statistics.median(comm) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tp", default="1,3")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--quantization", default=None)
    args = p.parse_args()
    print(f"machine: {machine()}")
    print(f"model {args.model}, quantization {args.quantization or 'as stored'}, float32 activations, "
          f"{args.steps} decode steps per row (median)\n")
    rows = []
    for tp in [int(x) for x in args.tp.split(",")]:
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=args.model, quantization=args.quantization, tensor_parallel_size=tp,
                                        kv_cache_memory_gb=0.5), progress=False)
        start_s = time.perf_counter() - t0
        weights = weight_bytes(engine.model) / 1e6
        kv = sum(k.numel() * k.element_size() * 2 for k, _ in engine.runner.kv_caches) / 1e6
        pids = [os.getpid()] + ([pr.pid for pr in engine.ranks.procs.values()] if engine.ranks else [])
        for batch in [int(x) for x in args.batches.split(",")]:
            print(f"tp {tp}: batch {batch} ...", file=sys.stderr, flush=True)
            step_ms, comm_ms = decode_steps(engine, batch, args.steps)
            rows.append((tp, batch, step_ms, comm_ms, batch / step_ms * 1e3))
        rss = [rss_mb(pid) for pid in pids]
        print(f"tp {tp}: start-up {start_s:.1f} s, rank 0 weights {weights:.0f} MB, KV pool {kv:.0f} MB per rank, "
              f"RSS per rank {', '.join(f'{r:.0f}' for r in rss)} MB, {torch.get_num_threads()} thread(s) per rank")
        engine.shutdown()
        torch.set_num_threads(threads)
    base = {b: ms for tp, b, ms, _, _ in rows if tp == rows[0][0]}
    print("\n| tensor_parallel_size | batch | decode step ms | in collectives ms | tok/s | vs first size |")
    print("|---|---|---|---|---|---|")
    for tp, batch, ms, comm, tps in rows:
        print(f"| {tp} | {batch} | {ms:.1f} | {comm:.1f} | {tps:.1f} | {base[batch] / ms:.2f}x |")


if __name__ == "__main__":
    main()
