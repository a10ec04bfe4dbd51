"""Speculative decoding on the default model: plain against speculative decode, same process, greedy.

  ngram:      input-grounded chat prompts (repeat / edit / summarise a text given in the prompt),
              the target as stored, batch 1, k in --ks
  self-draft: open chat prompts; target = the GGUF dequantized to float32 (the exact path), draft =
              the same file run as stored (int4 kernel); what a draft token costs against a target step
  batch:      n-gram on input-grounded prompts at batch 1..32, where speculation stops paying
  decode tok/s: output tokens after the first / (finish - first token), summed over requests
  Every speculative run is checked token-identical to the plain run (greedy).

python benchmarks/spec_decode.py [--parts ngram,self,batch] [--ks 1,3,5] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.model_files import resolve_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import machine  # noqa: E402

CODE = '''def merge_intervals(intervals):
    intervals = sorted(intervals, key=lambda iv: iv[0])
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged
'''
TEXT = ("The river Thames flows through southern England, including London. It is the longest river entirely "
        "in England and the second longest in the United Kingdom, after the Severn. The river rises at Thames "
        "Head in Gloucestershire and flows into the Thames Estuary, a tidal stretch, before the North Sea.")
GROUNDED = [
    f"Repeat this Python code exactly, with no comment:\n\n{CODE}",
    f"Rename the function to merge_ranges and return the whole code:\n\n{CODE}",
    f"Copy this paragraph word for word:\n\n{TEXT}",
    f"Rewrite this paragraph, changing 'river' to 'River':\n\n{TEXT}",
]
OPEN = ["What is the capital of France? Tell me about it.", "Write a short poem about the sea.",
        "Explain how a bicycle works.", "Give me three tips for learning to cook."]


def chat_ids(llm: LLM, prompts: list[str]) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in prompts]


def decode_run(llm: LLM, prompts: list[list[int]], max_tokens: int, batch: int) -> tuple[float, list[list[int]]]:
    """Decode tok/s with `batch` requests in flight (prompts cycled), and the token ids."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    todo = [prompts[i % len(prompts)] for i in range(max(batch, len(prompts)))]
    tokens, seconds, outs = 0, 0.0, []
    for i in range(0, len(todo), batch):
        done = llm.generate(todo[i:i + batch], params, use_tqdm=False)
        first = min(o.metrics.first_token_time for o in done)
        last = max(o.metrics.finished_time for o in done)
        tokens += sum(len(o.outputs[0].token_ids) - 1 for o in done)
        seconds += last - first
        outs += [o.outputs[0].token_ids for o in done]
    return tokens / seconds, outs


def engine(model: Path, spec: dict | None, **kw) -> LLM:
    return LLM(str(model), speculative_config=spec, max_model_len=1024, progress=False, **kw)


def row(name: str, plain: float, llm: LLM, fast: float, same: bool) -> str:
    s = llm.engine.spec_stats
    rates = " ".join(f"{r:.2f}" for r in s.acceptance_per_position)
    return (f"| {name} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f}x | {s.acceptance_rate:.2f} | "
            f"{s.mean_acceptance_length:.2f} | {rates} | {'yes' if same else 'NO'} |")


HEADER = ("| run | plain tok/s | spec tok/s | speedup | acceptance | mean accepted length | per position | same tokens |\n"
          "|---|---|---|---|---|---|---|---|")


def ngram_part(model: Path, ks: list[int], max_tokens: int) -> None:
    plain = engine(model, None)
    prompts = chat_ids(plain, GROUNDED)
    base, want = decode_run(plain, prompts, max_tokens, 1)
    print("\n### n-gram, input-grounded prompts, batch 1, target as stored\n\n" + HEADER)
    for k in ks:
        for lo, hi in ((1, 4), (2, 4)):
            llm = engine(model, {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo,
                                 "prompt_lookup_max": hi})
            fast, got = decode_run(llm, prompts, max_tokens, 1)
            print(row(f"k={k}, n-gram {lo}..{hi}", base, llm, fast, got == want), flush=True)


def self_part(model: Path, ks: list[int], max_tokens: int) -> None:
    plain = engine(model, None, quantization="dequantize")
    prompts = chat_ids(plain, OPEN)
    base, want = decode_run(plain, prompts, max_tokens, 1)
    draft_alone = engine(model, None)
    draft_speed, _ = decode_run(draft_alone, prompts[:2], max_tokens, 1)
    print(f"\n### self-draft, open chat prompts, batch 1: target dequantized float32 ({base:.1f} tok/s alone), "
          f"draft = the file as stored ({draft_speed:.1f} tok/s alone: a draft token costs "
          f"{base / draft_speed:.2f} of a target token)\n\n" + HEADER)
    for k in ks:
        llm = engine(model, {"method": "draft_model", "model": str(model), "num_speculative_tokens": k},
                     quantization="dequantize")
        fast, got = decode_run(llm, prompts, max_tokens, 1)
        print(row(f"k={k}", base, llm, fast, got == want), flush=True)


def batch_part(model: Path, batches: list[int], max_tokens: int, k: int) -> None:
    print(f"\n### n-gram (k={k}, 2..4) against plain by batch size, input-grounded prompts, target as stored\n\n"
          "| batch | plain tok/s | spec tok/s | ratio | acceptance |\n|---|---|---|---|---|")
    plain = engine(model, None)
    prompts = chat_ids(plain, GROUNDED)
    for b in batches:
        base, _ = decode_run(plain, prompts, max_tokens, b)
        llm = engine(model, {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2,
                             "disable_by_batch_size": None})
        fast, _ = decode_run(llm, prompts, max_tokens, b)
        print(f"| {b} | {base:.1f} | {fast:.1f} | {fast / base:.2f}x | {llm.engine.spec_stats.acceptance_rate:.2f} |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="ngram,self,batch")
    ap.add_argument("--ks", default="1,3,5")
    ap.add_argument("--batches", default="1,4,8,16,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    model = resolve_model(None)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"machine: {machine()}")
    parts = args.parts.split(",")
    if "ngram" in parts:
        ngram_part(model, ks, args.max_tokens)
    if "self" in parts:
        self_part(model, ks, args.max_tokens)
    if "batch" in parts:
        batch_part(model, [int(b) for b in args.batches.split(",")], args.max_tokens, 3)


if __name__ == "__main__":
    main()
