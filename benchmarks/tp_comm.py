"""What tensor parallelism's communication costs on this machine: gloo collectives between CPU processes.

Spawns `--world-size` CPU processes (torch.multiprocessing, spawn) joined by a TCPStore on 127.0.0.1 and
a gloo process group, and measures, as medians over `--iters` iterations after a warm-up:

  a) dist.all_reduce of a float32 [tokens, hidden] tensor for the hidden sizes of SmolLM2-135M (576),
     Gemma 3 270M (640) and larger models (2048, 4096), tokens 1..2048; one bfloat16 row if gloo takes it;
  b) the communication of one tensor-parallel decode step as the engine would run it: one broadcast of
     the step message from rank 0, 2 * layers + 1 all-reduces of [batch, hidden] float32 (embedding,
     then o_proj and down_proj per layer) and one gather of [batch, vocab / world] float32 logits to
     rank 0, for SmolLM2-135M and Gemma 3 270M at batch 1 and 64;
  c) dist.broadcast_object_list of that small step message alone.

Each iteration starts after a barrier; a figure is the slowest rank's time for that iteration
(per-iteration max over ranks), then median / p90 over iterations.

  python benchmarks/tp_comm.py [--world-size 2] [--iters 50] [--threads N]

Tables go to stdout (markdown), progress to stderr.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDENS = (576, 640, 2048, 4096)
TOKENS = (1, 8, 64, 256, 2048)
MODELS = (  # name, layers, hidden, vocab
    ("SmolLM2-135M", 30, 576, 49152),
    ("Gemma 3 270M", 18, 640, 262144),
)
BATCHES = (1, 64)
WARMUP = 5


def log(msg: str) -> None:
    print(f"[tp_comm] {msg}", file=sys.stderr, flush=True)


def machine() -> list[str]:
    model, extra = platform.processor() or "?", []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key == "Model name":
                model = value.strip()
            elif key in ("CPU family", "Model", "Socket(s)", "Hypervisor vendor"):
                extra.append(f"{key.lower()} {value.strip()}")
    except (OSError, subprocess.SubprocessError):
        pass
    if extra:
        model += f" ({', '.join(extra)})"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    feats = [f"capability {torch.backends.cpu.get_cpu_capability()}"]
    for name in ("avx2", "avx512", "vnni", "avx512_bf16", "amx_tile", "amx_fp16", "arm_sve"):
        fn = getattr(torch.cpu, f"_is_{name}_supported", None)
        if fn is not None:
            try:
                feats.append(f"{name}={'yes' if fn() else 'no'}")
            except Exception:  # noqa: BLE001 - a probe that fails says nothing
                pass
    return [
        f"- CPU: {model}, {os.cpu_count()} logical CPUs ({affinity} usable), {platform.machine()}",
        f"- torch {torch.__version__}, python {platform.python_version()}, gloo backend"
        f" (available: {dist.is_gloo_available()})",
        f"- CPU features (torch): {', '.join(feats)}",
        f"- load average before the run (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- worker side

def timed(fn, iters: int) -> list[float]:
    """Per-iteration seconds, the slowest rank's, after WARMUP untimed runs; every iteration starts at a barrier."""
    for _ in range(WARMUP):
        fn()
    times = torch.zeros(iters, dtype=torch.float64)
    for i in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return times.tolist()


def stats(times: list[float]) -> tuple[float, float]:
    s = sorted(times)
    return statistics.median(s), s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def step_message(batch: int) -> dict:
    return {
        "kind": "decode",
        "token_ids": torch.arange(batch, dtype=torch.int64),
        "positions": torch.arange(batch, dtype=torch.int64) + 100,
        "seq_slots": torch.arange(batch, dtype=torch.int64),
        "block_table_row": list(range(64)),
    }


def bench_all_reduce(rank: int, world: int, iters: int, out: list[str]) -> None:
    factor = 2 * (world - 1) / world
    out += ["## a) dist.all_reduce (gloo), float32 [tokens, hidden]", "",
            f"algbw = bytes / time; busbw = algbw x 2(N-1)/N = algbw x {factor:g} (nccl-tests' convention: "
            "the bytes each rank sends in a ring all-reduce, per second). GB = 1e9 bytes.", "",
            "| hidden | tokens | dtype | bytes | median µs | p90 µs | algbw GB/s | busbw GB/s |",
            "|---:|---:|---|---:|---:|---:|---:|---:|"]
    cases = [(h, t, torch.float32) for h in HIDDENS for t in TOKENS] + [(4096, t, torch.bfloat16) for t in (1, 64, 2048)]
    for hidden, tokens, dtype in cases:
        x = torch.full((tokens, hidden), float(rank + 1), dtype=dtype)
        nbytes = x.numel() * x.element_size()
        name = str(dtype).replace("torch.", "")
        if rank == 0:
            log(f"all_reduce {name} [{tokens}, {hidden}] ({nbytes} B)")
        try:
            # run once outside timing to catch an unsupported dtype on every rank alike
            dist.all_reduce(x)
            ok = abs(float(x[0, 0]) - world * (world + 1) / 2) < 1e-2 * world * world
            x.zero_()  # timed runs sum zeros: values stay finite whatever --iters
        except Exception as e:  # noqa: BLE001 - report, do not crash
            out.append(f"| {hidden} | {tokens} | {name} | {nbytes} | not supported: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]} | | | |")
            continue
        med, p90 = stats(timed(lambda: dist.all_reduce(x), iters))
        alg = nbytes / med / 1e9
        check = "" if ok else " (WRONG SUM)"
        out.append(f"| {hidden} | {tokens} | {name}{check} | {nbytes:,} | {med * 1e6:,.0f} | {p90 * 1e6:,.0f} "
                   f"| {alg:.2f} | {alg * factor:.2f} |")
    out.append("")


def bench_decode_step(rank: int, world: int, iters: int, out: list[str]) -> None:
    out += ["## b) communication of one tensor-parallel decode step", "",
            "broadcast_object_list(step message) from rank 0, then 2*layers+1 all_reduce of [batch, hidden] "
            "float32, then gather of [batch, vocab/world] float32 logits to rank 0, back to back (no compute). "
            "Component columns: the same steps, each part timed on its own clock (median of the slowest rank).", "",
            "| model | batch | all-reduces | bytes each | gather bytes / rank | median ms / step | p90 ms "
            "| of which: broadcast ms | all-reduces ms | gather ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, layers, hidden, vocab in MODELS:
        for batch in BATCHES:
            if rank == 0:
                log(f"decode step {name} batch {batch}")
            h = torch.ones(batch, hidden)
            shard = torch.ones(batch, vocab // world)
            gather_list = [torch.empty_like(shard) for _ in range(world)] if rank == 0 else None
            msg = step_message(batch)
            n_ar = 2 * layers + 1
            parts = torch.zeros(3, dtype=torch.float64)

            def step():
                t0 = time.perf_counter()
                box = [msg if rank == 0 else None]
                dist.broadcast_object_list(box, src=0)
                t1 = time.perf_counter()
                for _ in range(n_ar):
                    dist.all_reduce(h)
                    h.fill_(1.0)  # keep values finite; the engine would overwrite h with the next layer's output
                t2 = time.perf_counter()
                dist.gather(shard, gather_list, dst=0)
                t3 = time.perf_counter()
                parts[0], parts[1], parts[2] = t1 - t0, t2 - t1, t3 - t2

            per_part = [[], [], []]

            def recorded():
                step()
                for k in range(3):
                    per_part[k].append(float(parts[k]))

            times = timed(recorded, iters)
            med, p90 = stats(times)
            comp = []
            for k in range(3):
                vals = torch.tensor(per_part[k][WARMUP:], dtype=torch.float64)
                dist.all_reduce(vals, op=dist.ReduceOp.MAX)
                comp.append(statistics.median(vals.tolist()))
            out.append(f"| {name} (L={layers}, h={hidden}, V={vocab}) | {batch} | {n_ar} | {batch * hidden * 4:,} "
                       f"| {shard.numel() * 4:,} | {med * 1e3:.2f} | {p90 * 1e3:.2f} | {comp[0] * 1e3:.2f} "
                       f"| {comp[1] * 1e3:.2f} | {comp[2] * 1e3:.2f} |")
    out.append("")


def bench_broadcast(rank: int, world: int, iters: int, out: list[str]) -> None:
    import pickle
    out += ["## c) dist.broadcast_object_list of the step message alone", "",
            "Message: dict with 3 int64 tensors of size batch and a list of 64 ints, pickled by torch "
            "(a size broadcast, then a byte-tensor broadcast).", "",
            "| batch | pickled bytes | median µs | p90 µs |", "|---:|---:|---:|---:|"]
    for batch in BATCHES:
        msg = step_message(batch)
        if rank == 0:
            log(f"broadcast_object_list batch {batch}")

        def bcast():
            box = [msg if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)

        med, p90 = stats(timed(bcast, iters))
        out.append(f"| {batch} | {len(pickle.dumps(msg)):,} | {med * 1e6:,.0f} | {p90 * 1e6:,.0f} |")
    out.append("")


def bench_gather(rank: int, world: int, iters: int, out: list[str]) -> None:
    out += ["## d) dist.gather of logits shards to rank 0 alone (float32)", "",
            "| vocab | batch | bytes / rank | median µs | p90 µs | GB/s into rank 0 |", "|---:|---:|---:|---:|---:|---:|"]
    for _, _, _, vocab in MODELS:
        for batch in BATCHES:
            shard = torch.ones(batch, vocab // world)
            gl = [torch.empty_like(shard) for _ in range(world)] if rank == 0 else None
            if rank == 0:
                log(f"gather vocab {vocab} batch {batch}")
            med, p90 = stats(timed(lambda: dist.gather(shard, gl, dst=0), iters))
            nbytes = shard.numel() * 4
            out.append(f"| {vocab} | {batch} | {nbytes:,} | {med * 1e6:,.0f} | {p90 * 1e6:,.0f} "
                       f"| {nbytes * (world - 1) / med / 1e9:.2f} |")
    out.append("")


def worker(rank: int, world: int, port: int, iters: int, threads: int) -> None:
    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=(rank == 0), wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        out: list[str] = []
        bench_all_reduce(rank, world, iters, out)
        bench_decode_step(rank, world, iters, out)
        bench_broadcast(rank, world, iters, out)
        bench_gather(rank, world, iters, out)
        dist.barrier()
        if rank == 0:
            print("\n".join(out), flush=True)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- parent side

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                    help="torch intra-op threads per rank (default: half the CPUs; ranks share the machine)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before the ranks are killed")
    args = ap.parse_args()
    if args.world_size < 2:
        ap.error("--world-size must be at least 2")

    print("# tensor-parallel communication (gloo, CPU)\n")
    print("\n".join(machine()))
    print(f"- run: world size {args.world_size}, {args.iters} timed iterations after {WARMUP} warm-up, "
          f"{args.threads} torch threads per rank, {datetime.date.today().isoformat()}\n", flush=True)

    # a SIGTERM (e.g. from `timeout`) unwinds through the finally below, which stops the ranks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, args.world_size, port, args.iters, args.threads), daemon=True)
             for r in range(args.world_size)]
    t_start = time.time()
    failed = False
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                failed = True
                log("a rank failed; stopping the others")
                break
            if time.time() - t_start > args.timeout:
                failed = True
                log(f"timed out after {args.timeout:.0f} s; stopping the ranks")
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    failed = failed or any(p.exitcode != 0 for p in procs)
    log(f"done in {time.time() - t_start:.1f} s" + (" (FAILED: exit codes "
        f"{[p.exitcode for p in procs]})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
