"""Offline throughput against llama.cpp's own batched engine on the same file, in alternating rounds so both see
the same spells of a noisy machine (issue 8's target: >= 3x llama-batched-bench).

  tokenmill:   --requests requests x (--input-len random prompt tokens, --output-len new tokens), all submitted at
               once, greedy, ignore_eos; a new engine each round (`tokenmill bench`'s measurement)
  llama.cpp:   llama-batched-bench -npl REQUESTS -npp INPUT -ntg OUTPUT -t THREADS on the same file (built by
               benchmarks/build_llama_cpp.sh); its total time T, so both rates are generated tokens over the
               whole run, prompts included

python benchmarks/offline_vs_llama.py [--model smollm2-135m] [--rounds 3] [--requests 64] [--input-len 128]
                                      [--output-len 128] [--quantization Q] [--kv-cache-dtype auto]
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantization import llama_tool, machine  # noqa: E402


def llama_batched_bench(model_path: Path, requests: int, input_len: int, output_len: int, threads: int) -> float:
    """Generated tokens per second of the whole llama-batched-bench run (prompt processing included)."""
    exe = llama_tool("llama-batched-bench")
    if exe is None:
        raise SystemExit("llama-batched-bench not built: run benchmarks/build_llama_cpp.sh")
    context = requests * (input_len + output_len) + 512
    out = subprocess.run([str(exe), "-m", str(model_path), "-npl", str(requests), "-npp", str(input_len),
                          "-ntg", str(output_len), "-c", str(context), "-t", str(threads)],
                         capture_output=True, text=True, check=True).stdout
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    row = re.search(rf"\|\s*{input_len}\s*\|\s*{output_len}\s*\|\s*{requests}\s*\|([^\n]*)", out)
    if row is None:
        raise SystemExit(f"no result row in llama-batched-bench's output:\n{out}")
    total_s = float(row.group(1).split("|")[5])
    return requests * output_len / total_s


def tokenmill_offline(model: str, requests: int, input_len: int, output_len: int, quantization: str | None,
                      kv_cache_dtype: str) -> float:
    from tokenmill.cli import run_offline_bench
    from tokenmill.config import EngineConfig
    from tokenmill.engine import LLMEngine
    from tokenmill.model_files import resolve_model
    engine = LLMEngine(EngineConfig(model=str(resolve_model(model)), quantization=quantization,
                                    kv_cache_dtype=kv_cache_dtype, max_num_seqs=requests))
    return run_offline_bench(engine, requests, input_len, output_len)["output_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    args = ap.parse_args()
    from tokenmill.model_files import resolve_model
    path = resolve_model(args.model)
    threads = torch.get_num_threads()
    pairs = []
    for i in range(args.rounds):
        print(f"[round {i + 1} of {args.rounds}] tokenmill, then llama-batched-bench", file=sys.stderr)
        ours = tokenmill_offline(args.model, args.requests, args.input_len, args.output_len, args.quantization,
                                 args.kv_cache_dtype)
        pairs.append((ours, llama_batched_bench(path, args.requests, args.input_len, args.output_len, threads)))
    print(f"\nmachine: {machine()}")
    print(f"model: {path.name}, kv_cache_dtype {args.kv_cache_dtype}; {args.requests} requests x ({args.input_len} in, {args.output_len} out); tok/s = "
          f"generated tokens / whole run; llama.cpp: llama-batched-bench -npl {args.requests} -npp {args.input_len} "
          f"-ntg {args.output_len} -t {threads}, right after each tokenmill run ({llama_tool('llama-batched-bench')})\n")
    print("| round | tokenmill tok/s | llama-batched-bench tok/s | ratio |")
    print("|---|---|---|---|")
    for i, (ours, theirs) in enumerate(pairs):
        print(f"| {i + 1} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    print(f"| median | {statistics.median(a for a, _ in pairs):.1f} | {statistics.median(b for _, b in pairs):.1f} | "
          f"{statistics.median(a / b for a, b in pairs):.2f}x |")


if __name__ == "__main__":
    main()
