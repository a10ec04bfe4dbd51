"""The quantization table on the default model: for each way of running it, resident weight MB,
perplexity, batch-1 decode tok/s and offline throughput, side by side in one process.

  weights:     resident bytes of every weight tensor (a tied table once), vs the GGUF file's tensor bytes
  perplexity:  `tokenmill perplexity`'s method, --windows windows of 512 on pydoc topics' evaluation half
  batch-1:     one request, 128 new tokens (median of 3), llama.cpp's own loop on the same file beside it
  offline:     --requests requests x (128 in, 128 out), ignore_eos

python benchmarks/quantization.py [--model gemma-3-270m] [--methods gguf,dequantize,dequantize-bf16,int4,int8] [--requests 64] [--windows 4]
                                  [--checkpoint gptq-g64=DIR ...]   (a checkpoint run as stored, e.g. from `tokenmill quantize`)
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams, kernels  # noqa: E402
from tokenmill.cli import run_offline_bench  # noqa: E402
from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.loader.gguf import GGUFCheckpoint  # noqa: E402
from tokenmill.model.load import describe_weights, weight_bytes  # noqa: E402
from tokenmill.model_files import home, resolve_model  # noqa: E402
from tokenmill.perplexity import perplexity, reference_text  # noqa: E402

METHODS = {   # row name -> (quantization, dtype)
    "gguf": (None, "float32"), "dequantize": ("dequantize", "float32"),
    "dequantize-bf16": ("dequantize", "bfloat16"), "int4": ("int4", "float32"), "int8": ("int8", "float32"),
}


def llama_tool(name: str) -> Path | None:
    """One of llama.cpp's own tools (llama-bench, llama-batched-bench, ...) as benchmarks/build_llama_cpp.sh
    builds them under the tokenmill home: its AVX-512 VNNI set where tokenmill's kernels run their VNNI build
    and that set is built (LLAMA_ISA=avx512), else the AVX2 set; None when neither is built."""
    sets = sorted(home().glob(f"llama.cpp-*/bin/{name}"), key=lambda p: p.parent.parent.name.endswith("-avx512"))
    if kernels.build() != "vnni":
        sets = [p for p in sets if not p.parent.parent.name.endswith("-avx512")]
    return sets[-1] if sets else None


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    feats = [f for f in ("avx512_bf16", "vnni", "amx_tile") if getattr(torch.cpu, f"_is_{f}_supported", lambda: False)()]
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, capability "
            f"{torch.backends.cpu.get_cpu_capability()}, features: {', '.join(feats) or 'none of avx512_bf16/vnni/amx'}, "
            f"tokenmill kernels: {kernels.build() or 'off'}")


def batch1(llm: LLM, n: int = 128) -> float:
    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm.generate(["Hello"], SamplingParams(max_tokens=4), use_tqdm=False)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        llm.generate(["The history of the Roman empire"], p, use_tqdm=False)
        times.append(time.perf_counter() - t)
    return n / sorted(times)[1]


def llama_cpp_batch1(path: Path, n: int = 128) -> float | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    lc = llama_cpp.Llama(str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    ids = lc.tokenize(b"The history of the Roman empire")
    times = []
    for _ in range(3):
        lc.reset()
        lc.eval(ids)
        t = time.perf_counter()
        for _ in range(n):
            lc.eval([lc.sample(temp=0.0, top_k=1)])
        times.append(time.perf_counter() - t)
    return n / sorted(times)[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a short name or GGUF path (default: the default model)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--checkpoint", action="append", default=[], help="NAME=PATH: also run this checkpoint as stored")
    args = ap.parse_args()
    extra = dict(c.split("=", 1) for c in args.checkpoint)
    path = resolve_model(args.model)
    file_mb = sum(t.n_bytes for t in GGUFCheckpoint(path)._tensors.values()) / 1e6
    eval_text = reference_text("evaluation")
    rows = []
    for name in [m for m in args.methods.split(",") if m] + list(extra):
        quantization, dtype = METHODS.get(name, (None, "float32"))
        print(f"[{name}] loading", file=sys.stderr)
        llm = LLM.from_config(EngineConfig(model=extra.get(name, str(path)), quantization=quantization, dtype=dtype),
                              progress=False)
        mb = weight_bytes(llm.engine.model) / 1e6
        print(f"[{name}] {describe_weights(llm.engine.model)}; perplexity", file=sys.stderr)
        ppl = perplexity(llm, llm.get_tokenizer().encode(eval_text), 512, args.windows, use_tqdm=False).ppl
        print(f"[{name}] batch-1", file=sys.stderr)
        b1 = batch1(llm)
        print(f"[{name}] offline {args.requests} x (128 in, 128 out)", file=sys.stderr)
        off = run_offline_bench(llm.engine, args.requests, 128, 128)["output_tok_s"]
        rows.append((name, mb, ppl, b1, off))
        del llm
    ref = llama_cpp_batch1(path)
    print(f"\nmachine: {machine()}")
    print(f"model: {path.name} (tensor bytes {file_mb:.1f} MB); perplexity: {args.windows} x 512-token windows\n")
    print("| method | weights MB | x file | perplexity | batch-1 tok/s | vs llama.cpp | offline tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, mb, ppl, b1, off in rows:
        vs = f"{b1 / ref:.2f}x" if ref else "-"
        print(f"| {name} | {mb:.1f} | {mb / file_mb:.2f} | {ppl:.4f} | {b1:.1f} | {vs} | {off:.1f} |")
    if ref:
        print(f"| llama.cpp (llama-cpp-python eval loop, same file) | - | - | - | {ref:.1f} | 1.00x | - |")


if __name__ == "__main__":
    main()
