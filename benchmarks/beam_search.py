"""Beam search throughput on the default model: tokenmill (beam groups continuously batched in its
scheduler) against transformers' beam search, prompt by prompt and batched, in one process.

  16 prompts of 128 random tokens, beam width 4, 64 new tokens, EOS ignored (every beam runs the
  whole length, so all engines do the same work); float32 weights dequantized from the GGUF file
  for both (transformers reads the same file).
  best-beam tok/s:  16 x 64 / wall time        beam tok/s:  16 x 4 x 64 / wall time
  pages:  the most KV pages one request held at once, against its prompt's pages + one tail per beam

python benchmarks/beam_search.py [--prompts 16] [--input-len 128] [--width 4] [--new-tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, BeamSearchParams  # noqa: E402
from tokenmill.model_files import resolve_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import machine  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def tokenmill_run(llm: LLM, prompts: list[list[int]], params: BeamSearchParams) -> list[list[list[int]]]:
    return [[s.token_ids for s in o.sequences] for o in llm.beam_search(prompts, params, use_tqdm=False)]


def hf_run(model, prompts: list[list[int]], width: int, new_tokens: int, batched: bool) -> list[list[list[int]]]:
    groups = [prompts] if batched else [[p] for p in prompts]    # equal lengths: no padding needed
    beams = []
    with torch.no_grad():
        for group in groups:
            seqs = model.generate(torch.tensor(group), num_beams=width, num_return_sequences=width, do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                  pad_token_id=0)
            out = seqs[:, len(group[0]):].tolist()
            beams += [out[i:i + width] for i in range(0, len(out), width)]
    return beams


def page_profile(llm: LLM, prompt: list[int], params: BeamSearchParams) -> tuple[int, int]:
    """(most pages held at once, pages of the prompt) for one request alone."""
    engine, bm = llm.engine, llm.engine.block_manager
    engine.add_request("pages", prompt, params)
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        most = max(most, bm.num_blocks - bm.num_free_blocks)
    return most, bm.blocks_needed(len(prompt))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers as tf
    path = resolve_model(None)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.input_len,), generator=gen).tolist() for _ in range(args.prompts)]
    params = BeamSearchParams(args.width, max_tokens=args.new_tokens, ignore_eos=True)
    print(f"machine: {machine()}", flush=True)
    print(f"{args.prompts} prompts x {args.input_len} tokens, beam width {args.width}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}", flush=True)

    llm = LLM(str(path), quantization="dequantize", progress=False)
    tokenmill_run(llm, prompts[:2], BeamSearchParams(args.width, max_tokens=4))     # warm-up
    rows = []
    t, ours = timed(lambda: tokenmill_run(llm, prompts, params), args.repeats)
    rows.append(("tokenmill (dequantized float32)", t))
    packed = LLM(str(path), progress=False)
    t_packed, _ = timed(lambda: tokenmill_run(packed, prompts, params), args.repeats)
    rows.append(("tokenmill (GGUF as stored)", t_packed))
    del packed

    hf = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_run(hf, prompts[:1], args.width, 4, batched=True)                             # warm-up
    t_one, by_prompt = timed(lambda: hf_run(hf, prompts, args.width, args.new_tokens, batched=False), 1)
    rows.append(("transformers, prompt by prompt", t_one))
    t_batch, batched = timed(lambda: hf_run(hf, prompts, args.width, args.new_tokens, batched=True), 1)
    rows.append(("transformers, batched", t_batch))

    same = sum(a == b for a, b in zip(ours, by_prompt))
    fastest_hf = min(t_one, t_batch)
    print(f"\n| engine | wall s | best-beam tok/s | beam tok/s | vs faster transformers |")
    print("|---|---:|---:|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {args.prompts * args.new_tokens / t:.1f} | "
              f"{args.prompts * args.width * args.new_tokens / t:.1f} | {fastest_hf / t:.2f}x |")
    print(f"\nbeams identical to transformers prompt by prompt: {same} / {len(prompts)} prompts "
          f"(batched transformers: {sum(a == b for a, b in zip(ours, batched))} / {len(prompts)})")
    most, prompt_pages = page_profile(llm, prompts[0], params)
    tail = llm.engine.block_manager.blocks_needed(args.new_tokens + 1)
    print(f"pages of one request ({llm.engine.config.block_size} tokens each): at most {most} held at once; "
          f"prompt {prompt_pages} once + {args.width} beams x <= {tail} tail pages = <= "
          f"{prompt_pages + args.width * tail}; without sharing {args.width} x {prompt_pages + tail} = "
          f"{args.width * (prompt_pages + tail)}")


if __name__ == "__main__":
    main()
