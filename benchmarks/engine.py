"""Engine benchmark on the SmolLM2 GGUF: tokenmill vs transformers generate (same dequantized weights,
float32 and bfloat16) vs llama.cpp (llama-cpp-python, same file), side by side in one run.

  batch-1:  one request, 128 prompt tokens, 128 new tokens: TTFT and decode tok/s
  offline:  N requests (default 64), 128 in / 128 out, ignore_eos: output tok/s

Prints a markdown table.  python benchmarks/engine.py [--requests 64] [--dtypes float32,bfloat16] [--skip transformers,llama.cpp]

  --rounds N: then only the offline figure, tokenmill (as stored) and transformers in the first of --dtypes,
              N alternating rounds (each engine loaded afresh), so both see the same spells of a noisy machine;
              each round's tok/s and ratio, and the medians
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.cli import run_offline_bench  # noqa: E402
from tokenmill.config import EngineConfig, cpu_has_amx_bf16  # noqa: E402
from tokenmill.engine import LLMEngine  # noqa: E402
from tokenmill.model_files import resolve_model  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

IN, OUT = 128, 128


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(IN)] for _ in range(n)]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (GPU timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def tokenmill_engine(path: Path, n: int, dtype: str, device: str | None = None,
                     quantization: str | None = None, enforce_eager: bool = False) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), max_num_seqs=max(64, n), max_num_batched_tokens=2048, dtype=dtype,
                                  device=device, quantization=quantization, enforce_eager=enforce_eager),
                     progress=False)


def bench_tokenmill(path: Path, n: int, repeats: int, dtype: str, device: str | None = None,
                    quantization: str | None = None, enforce_eager: bool = False) -> dict:
    """`device`, `quantization`, `enforce_eager`: EngineConfig's (benchmarks/gpu_engine.py runs this on a GPU)."""
    engine = tokenmill_engine(path, n, dtype, device, quantization, enforce_eager)
    if engine.config.torch_device.type == "cuda":
        run_offline_bench(engine, 4, IN, 8)          # warm-up: Triton compiles, the allocator
    vocab = engine.model_config.vocab_size
    ttft, decode = [], []
    params = SamplingParams(temperature=0, max_tokens=OUT, ignore_eos=True)
    for r in range(repeats):
        p = prompts(1, vocab, seed=100 + r)[0]
        t0 = time.perf_counter()
        engine.add_request(None, p, params)
        first = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            if first is None and outs:
                first = time.perf_counter()
        end = time.perf_counter()
        ttft.append(first - t0)
        decode.append((OUT - 1) / (end - first))
    off = run_offline_bench(engine, n, IN, OUT)
    return {"ttft_ms": 1000 * statistics.median(ttft), "decode_tok_s": statistics.median(decode),
            "offline_tok_s": off["output_tok_s"], "offline_requests": n}


def transformers_model(path: Path, dtype: str, device: str = "cpu"):
    """transformers' model of the GGUF file (dequantized by transformers) in `dtype` on `device`."""
    import transformers as tf
    tf.logging.set_verbosity_error()
    return tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   torch_dtype=getattr(torch, dtype)).to(device).eval()


def transformers_offline(model, n: int) -> float:
    """n random prompts in one padded batch through generate: output tok/s."""
    ids = torch.tensor(prompts(n, model.config.vocab_size), device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=OUT,
                       min_new_tokens=OUT, pad_token_id=0)
    sync(model.device)
    return n * OUT / (time.perf_counter() - t0)


def bench_transformers(path: Path, n: int, repeats: int, dtype: str, device: str = "cpu") -> dict:
    model = transformers_model(path, dtype, device)
    vocab = model.config.vocab_size
    kw = dict(do_sample=False, max_new_tokens=OUT, min_new_tokens=OUT, pad_token_id=0)
    ttft, decode = [], []
    with torch.inference_mode():
        for r in range(repeats):
            ids = torch.tensor(prompts(1, vocab, seed=100 + r), device=model.device)
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
            sync(model.device)
            t1 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            sync(model.device)
            t2 = time.perf_counter()
            ttft.append(t1 - t0)
            decode.append((OUT - 1) / ((t2 - t1) - (t1 - t0)))
    offline = transformers_offline(model, n)
    return {"ttft_ms": 1000 * statistics.median(ttft), "decode_tok_s": statistics.median(decode),
            "offline_tok_s": offline, "offline_requests": n}


def bench_llama_cpp(path: Path, n: int, repeats: int) -> dict:
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=IN + OUT + 8, n_threads=2, n_batch=512, verbose=False)
    vocab = llm.n_vocab()

    def run(p: list[int]) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(p)
        tok = int(llm.sample(temp=0.0)) if hasattr(llm, "sample") else 0
        t1 = time.perf_counter()
        for _ in range(OUT - 1):
            llm.eval([tok])
            tok = int(llm.sample(temp=0.0))
        return t1 - t0, time.perf_counter() - t1

    ttft, decode = [], []
    for r in range(repeats):
        a, b = run(prompts(1, vocab, seed=100 + r)[0])
        ttft.append(a)
        decode.append((OUT - 1) / b)
    t0 = time.perf_counter()
    for p in prompts(n, vocab):      # llama-cpp-python serves one sequence at a time
        run(p)
    offline = n * OUT / (time.perf_counter() - t0)
    return {"ttft_ms": 1000 * statistics.median(ttft), "decode_tok_s": statistics.median(decode),
            "offline_tok_s": offline, "offline_requests": n}


def offline_rounds(path: Path, n: int, rounds: int, dtype: str) -> None:
    rows = []
    for r in range(rounds):
        print(f"[round {r + 1} of {rounds}] tokenmill, then transformers", file=sys.stderr, flush=True)
        ours = run_offline_bench(tokenmill_engine(path, n, dtype), n, IN, OUT)["output_tok_s"]
        theirs = transformers_offline(transformers_model(path, dtype), n)
        rows.append((ours, theirs))
    amx = "AMX-BF16" if cpu_has_amx_bf16() else "no AMX"
    print(f"\nmodel: {path.name}; machine: {cpu_name()} ({amx}), {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {n} requests x ({IN} in, {OUT} out), {dtype}, rounds alternating\n")
    print(f"| round | tokenmill tok/s | transformers {dtype} tok/s | ratio |")
    print("|---|---|---|---|")
    for r, (a, b) in enumerate(rows):
        print(f"| {r + 1} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    print(f"| median | {statistics.median(a for a, _ in rows):.1f} | {statistics.median(b for _, b in rows):.1f} | "
          f"{statistics.median(a / b for a, b in rows):.2f}x |")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--llama-cpp-requests", type=int, default=16,
                    help="llama-cpp-python runs requests one after another; fewer keep the run short")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated engines to leave out: tokenmill,transformers,llama.cpp")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="run dtypes of tokenmill and transformers (llama.cpp runs the file's own Q4_1)")
    ap.add_argument("--rounds", type=int, default=0, help="alternating offline rounds against transformers (above)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    path = resolve_model(args.model)
    if args.rounds:
        offline_rounds(path, args.requests, args.rounds, args.dtypes.split(",")[0])
        return
    skip = set(filter(None, args.skip.split(",")))
    dtypes = args.dtypes.split(",")
    runs = {}
    for engine, bench in (("tokenmill", bench_tokenmill), ("transformers", bench_transformers)):
        for dtype in dtypes:
            if engine not in skip:
                runs[f"{engine} {dtype}"] = (lambda b, d: lambda: b(path, args.requests, args.repeats, d))(bench, dtype)
    if "llama.cpp" not in skip:
        runs["llama.cpp Q4_1"] = lambda: bench_llama_cpp(path, args.llama_cpp_requests, args.repeats)
    results = {}
    for name, fn in runs.items():
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = fn()
    amx = "AMX-BF16" if cpu_has_amx_bf16() else "no AMX"
    print(f"\nmodel: {path.name}; machine: {cpu_name()} ({amx}), "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| engine | TTFT ms (128 in) | batch-1 decode tok/s | offline output tok/s (requests) | offline vs transformers float32 |")
    print("|---|---|---|---|---|")
    base = results.get("transformers float32", {}).get("offline_tok_s")
    for name, r in results.items():
        ratio = f"{r['offline_tok_s'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['ttft_ms']:.0f} | {r['decode_tok_s']:.1f} | {r['offline_tok_s']:.1f} ({r['offline_requests']}) | {ratio} |")


if __name__ == "__main__":
    main()
