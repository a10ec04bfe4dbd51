"""Where a batch-1 decode step goes, with tokenmill's CPU kernels (kernels/cpu.c) and without them (PyTorch's
int4/int8 kernels, ATen's flash attention, PyTorch norms and rope), beside llama.cpp's own llama-bench on the
same file. Three modes, each in its own process:
  PyTorch's kernels       TOKENMILL_NATIVE_KERNELS=0
  tokenmill's, per op     the model's Python forward calling each kernel (kernels.DecoderStack off)
  tokenmill's, one call   every decoder layer of the step in one native call (kernels.DecoderStack), the default

  tok/s:      one request, --tokens new tokens after a 7-token prompt, greedy; median of --runs
  per step:   milliseconds per decode step in each part, from timers around the model's calls (a timer costs
              ~1 us a call; the parts are measured in a separate run from tok/s)

  --rounds N: then N rounds of (tokenmill one call, llama-bench), alternating, so both see the same spells of a
              noisy machine; each round's tok/s and ratio, and the medians

python benchmarks/decode_step.py [--model smollm2-135m] [--tokens 128] [--runs 5] [--threads 2] [--rounds 0]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantization import llama_tool, machine  # noqa: E402

PARTS = ["decoder layers (one native call)", "linears", "lm_head", "attention", "norms", "rope", "rest of the forward",
         "runner + sampler + scheduler"]
MODES = {"PyTorch's kernels": ("0", False), "tokenmill's, per op": ("1", False), "tokenmill's, one call": ("1", True)}


def measure(model: str, tokens: int, runs: int, stack: bool, rate_only: bool = False) -> dict:
    """In this process: tok/s, then (unless rate_only) the per-part breakdown."""
    from tokenmill import LLM, SamplingParams, kernels
    import tokenmill.model.layers as layers
    import tokenmill.model.llama as llama
    from tokenmill.model.linear import QLinear
    from tokenmill.runner import Runner

    if not stack:
        llama.LlamaForCausalLM._build_stack = lambda self: None
    llm = LLM(model, kv_cache_memory_gb=0.25, progress=False)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompt = "The history of the Roman empire"
    llm.generate([prompt], SamplingParams(max_tokens=8), use_tqdm=False)
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        rates.append(tokens / (time.perf_counter() - start))
        if len(out.token_ids) != tokens:        # a failed request ends early: its rate would be a fiction
            raise RuntimeError(f"{len(out.token_ids)} of {tokens} tokens ({out.finish_reason})")
    if rate_only:
        return {"tok_s": statistics.median(rates)}

    spent, calls = collections.Counter(), collections.Counter()

    def timed(owner, name, part, when=lambda *a: True):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if not when(*args):
                return original(*args, **kwargs)
            t = time.perf_counter()
            out = original(*args, **kwargs)
            spent[part] += time.perf_counter() - t
            calls[part] += 1
            return out
        setattr(owner, name, wrapper)

    model_obj = llm.engine.model
    timed(QLinear, "forward", "linears", lambda self, *a: self is not model_obj.lm_head)
    timed(QLinear, "forward", "lm_head", lambda self, *a: self is model_obj.lm_head)
    timed(type(llm.engine.runner.backend), "forward", "attention")
    timed(layers.RMSNorm, "forward", "norms")
    timed(llama, "apply_rope", "rope")
    timed(type(model_obj), "forward", "forward")
    timed(Runner, "execute", "execute")
    timed(kernels.DecoderStack, "__call__", "decoder layers (one native call)")
    start = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    wall = time.perf_counter() - start
    steps = calls["execute"]
    inside = ("decoder layers (one native call)", "linears", "attention", "norms", "rope")
    per_step = {p: 1e3 * spent[p] / steps for p in inside + ("lm_head",)}
    inner = sum(spent[p] for p in inside)
    per_step["rest of the forward"] = 1e3 * (spent["forward"] - inner) / steps
    per_step["runner + sampler + scheduler"] = 1e3 * (wall - spent["forward"] - spent["lm_head"]) / steps
    per_step["step (wall)"] = 1e3 * wall / steps
    return {"tok_s": statistics.median(rates), "per_step": per_step, "native": kernels.library() is not None}


def llama_bench(model_path: Path, tokens: int, threads: int) -> float | None:
    exe = llama_tool("llama-bench")
    if exe is None:
        return None
    out = subprocess.run([str(exe), "-m", str(model_path), "-t", str(threads), "-p", "0", "-n", str(tokens)],
                         capture_output=True, text=True).stdout
    m = re.search(r"tg\d+\s*\|\s*([\d.]+)", out)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--per-op", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rate-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=0, help="alternating rounds of one call and llama-bench")
    args = ap.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.model, args.tokens, args.runs, stack=not args.per_op, rate_only=args.rate_only)))
        return
    from tokenmill.model_files import resolve_model

    def child(switch: str, *flags: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--tokens", str(args.tokens),
                              "--runs", str(args.runs), "--threads", str(args.threads), *flags],
                             env=dict(os.environ, TOKENMILL_NATIVE_KERNELS=switch), capture_output=True, text=True,
                             check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    results = {}
    for label, (switch, stack) in MODES.items():
        print(f"[{label}] measuring", file=sys.stderr)
        results[label] = child(switch, *([] if stack else ["--per-op"]))
    print("[llama-bench] measuring", file=sys.stderr)
    ref = llama_bench(resolve_model(args.model), args.tokens, args.threads)
    print(f"\nmachine: {machine()}")
    print(f"model: {args.model}; batch 1, {args.tokens} new tokens, median of {args.runs}; "
          f"llama.cpp: llama-bench -t {args.threads} -p 0 -n {args.tokens}, run right after ({llama_tool('llama-bench')})\n")
    labels = list(results)
    print("| per decode step (ms) | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for part in PARTS + ["step (wall)"]:
        cells = [results[l]["per_step"][part] for l in labels]
        print(f"| {part} | " + " | ".join(f"{c:.2f}" if c else "–" for c in cells) + " |")
    print("| **tok/s** | " + " | ".join(f"**{results[l]['tok_s']:.1f}**" for l in labels) + " |")
    if ref:
        print("| vs llama.cpp (" + f"{ref:.1f} tok/s) | " + " | ".join(f"{results[l]['tok_s'] / ref:.2f}x" for l in labels)
              + " |")
    if args.rounds and ref:          # needs llama.cpp built (benchmarks/build_llama_cpp.sh)
        pairs = []
        for i in range(args.rounds):
            print(f"[round {i + 1} of {args.rounds}] tokenmill one call, then llama-bench", file=sys.stderr)
            pairs.append((child("1", "--rate-only")["tok_s"], llama_bench(resolve_model(args.model), args.tokens,
                                                                          args.threads)))
        print(f"\n{args.rounds} alternating rounds (tokenmill one call: median of {args.runs} runs; llama-bench -t "
              f"{args.threads} -p 0 -n {args.tokens}):\n")
        print("| round | tokenmill tok/s | llama-bench tok/s | ratio |")
        print("|---|---|---|---|")
        for i, (ours, theirs) in enumerate(pairs):
            print(f"| {i + 1} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
        ratios = [a / b for a, b in pairs]
        print(f"| median | {statistics.median(a for a, _ in pairs):.1f} | {statistics.median(b for _, b in pairs):.1f} | "
              f"{statistics.median(ratios):.2f}x |")


if __name__ == "__main__":
    main()
