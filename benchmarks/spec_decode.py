"""Speculative decoding on the default model: plain against speculative decode, same process, greedy.

  ngram:      input-grounded chat prompts (repeat / edit / rewrite a text given in the prompt),
              the target as stored, batch 1, k in 1, 3, 5, 7 (matches of 2..4 tokens; k=3 also 1..4)
  self-draft: open chat prompts; target = the GGUF dequantized to float32 (the exact path), draft =
              the same file run as stored (int4 kernel); what a draft token costs against a target step
  batch:      n-gram on input-grounded prompts at batch 1..32, where speculation stops paying; then
              the largest batch with the default disable_by_batch_size (8)
  decode tok/s: output tokens after the first / (finish - first token), summed over requests
  Plain and speculative runs alternate prompt by prompt (the machine's speed drifts); the speedup is
  the median of the per-prompt ratios. Every speculative run is compared token for token with the
  plain run (greedy).

python benchmarks/spec_decode.py [--parts ngram,self,batch] [--ks 1,3,5] [--max-tokens 128]
                                 [--batches 1,4,8,16,32] [--batch-max-tokens 64]
"""
from __future__ import annotations

import argparse
import statistics
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


def decode_run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[int, float, list[list[int]]]:
    """(output tokens after the first, seconds from first token to finish, token ids), prompts in one batch."""
    done = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    first = min(o.metrics.first_token_time for o in done)
    last = max(o.metrics.finished_time for o in done)
    return sum(len(o.outputs[0].token_ids) - 1 for o in done), last - first, [o.outputs[0].token_ids for o in done]


def paired(plain: LLM, spec: LLM, prompts: list[list[int]], max_tokens: int, batch: int = 1, repeats: int = 2
           ) -> tuple[float, float, float, bool]:
    """Plain and speculative runs of each batch of prompts back to back, in alternating order (this
    machine is shared: its speed drifts by 20 % over a minute). Returns plain tok/s, spec tok/s (all
    tokens over all time), the median of the per-pair ratios, and whether the tokens were the same."""
    todo = [prompts[i % len(prompts)] for i in range(max(batch, len(prompts)))]
    totals = {"plain": [0, 0.0], "spec": [0, 0.0]}
    ratios, same = [], True
    for r in range(repeats):
        for i in range(0, len(todo), batch):
            runs = {}
            for name in (("plain", "spec") if r % 2 == 0 else ("spec", "plain")):
                runs[name] = decode_run(plain if name == "plain" else spec, todo[i:i + batch], max_tokens)
                totals[name][0] += runs[name][0]
                totals[name][1] += runs[name][1]
            ratios.append((runs["spec"][0] / runs["spec"][1]) / (runs["plain"][0] / runs["plain"][1]))
            same &= runs["spec"][2] == runs["plain"][2]
    return (totals["plain"][0] / totals["plain"][1], totals["spec"][0] / totals["spec"][1],
            statistics.median(ratios), same)


def engine(model: Path, spec: dict | None, **kw) -> LLM:
    return LLM(str(model), speculative_config=spec, max_model_len=1024, progress=False, **kw)


def row(name: str, llm: LLM, result: tuple[float, float, float, bool]) -> str:
    plain, fast, ratio, same = result
    s = llm.engine.spec_stats
    rates = " ".join(f"{r:.2f}" for r in s.acceptance_per_position)
    return (f"| {name} | {plain:.1f} | {fast:.1f} | {ratio:.2f}x | {s.acceptance_rate:.2f} | "
            f"{s.mean_acceptance_length:.2f} | {rates} | {'yes' if same else 'NO'} |")


HEADER = ("| run | plain tok/s | spec tok/s | speedup (median of pairs) | acceptance | mean accepted length | "
          "per position | same tokens |\n|---|---|---|---|---|---|---|---|")


def ngram_part(model: Path, runs: list[tuple[int, int]], max_tokens: int) -> None:
    plain = engine(model, None)
    prompts = chat_ids(plain, GROUNDED)
    print("\n### n-gram, input-grounded prompts, batch 1, target as stored\n\n" + HEADER)
    for k, lo in runs:
        llm = engine(model, {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo,
                             "prompt_lookup_max": 4})
        print(row(f"k={k}, n-gram {lo}..4", llm, paired(plain, llm, prompts, max_tokens)), flush=True)


def self_part(model: Path, ks: list[int], max_tokens: int) -> None:
    plain = engine(model, None, quantization="dequantize")
    prompts = chat_ids(plain, OPEN)
    draft = engine(model, None)
    base, draft_speed, _, _ = paired(plain, draft, prompts[:2], max_tokens, repeats=1)
    print(f"\n### self-draft, open chat prompts, batch 1: target dequantized float32 ({base:.1f} tok/s alone), "
          f"draft = the file as stored ({draft_speed:.1f} tok/s alone: a draft token costs "
          f"{base / draft_speed:.2f} of a target token)\n\n" + HEADER)
    for k in ks:
        llm = engine(model, {"method": "draft_model", "model": str(model), "num_speculative_tokens": k},
                     quantization="dequantize")
        print(row(f"k={k}", llm, paired(plain, llm, prompts, max_tokens)), flush=True)


def batch_part(model: Path, batches: list[int], max_tokens: int, k: int) -> None:
    print(f"\n### n-gram (k={k}, 2..4) against plain by batch size, input-grounded prompts, target as stored\n\n"
          "| batch | disable_by_batch_size | plain tok/s | spec tok/s | ratio (median of pairs) | acceptance |\n"
          "|---|---|---|---|---|---|")
    plain = engine(model, None)
    prompts = chat_ids(plain, GROUNDED)
    for b, disable in [(b, None) for b in batches] + [(max(batches), 8)]:
        llm = engine(model, {"method": "ngram", "num_speculative_tokens": k, "disable_by_batch_size": disable})
        base, fast, ratio, _ = paired(plain, llm, prompts, max_tokens, b, repeats=2 if b < 16 else 1)
        print(f"| {b} | {disable or 'off'} | {base:.1f} | {fast:.1f} | {ratio:.2f}x | "
              f"{llm.engine.spec_stats.acceptance_rate:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="ngram,self,batch")
    ap.add_argument("--ks", default="1,3,5")
    ap.add_argument("--batches", default="1,4,8,16,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-max-tokens", type=int, default=64)
    args = ap.parse_args()
    model = resolve_model(None)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"machine: {machine()}")
    parts = args.parts.split(",")
    if "ngram" in parts:
        ngram_part(model, [(1, 2), (3, 1), (3, 2), (5, 2), (7, 2)], args.max_tokens)
    if "self" in parts:
        self_part(model, ks, args.max_tokens)
    if "batch" in parts:
        batch_part(model, [int(b) for b in args.batches.split(",")], args.batch_max_tokens, 3)


if __name__ == "__main__":
    main()
