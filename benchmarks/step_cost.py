"""Per-step cost versus context length: does a decode step's bookkeeping grow with the context?

A tiny random Llama (2 layers, hidden 64: the model itself costs almost nothing) decodes 32
sequences at once after prompts of 64, 2048 and 6000 tokens, with and without penalties, for each
output kind. For each case it prints the median wall time of a decode step, the part spent in the
model forward (attention over the whole context is expected to grow), and the rest: scheduling,
sampling, penalties, block tables, detokenizing and building outputs, which should stay flat.

  python benchmarks/step_cost.py [--seqs 32] [--contexts 64,2048,6000] [--steps 30]

Run it against another checkout (a baseline) with PYTHONPATH=<that checkout> and --no-path.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if "--no-path" not in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.engine import LLMEngine  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

VOCAB = 512


def tiny_model(directory: Path, max_positions: int) -> None:
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(directory)


def params(penalties: bool, kind) -> SamplingParams:
    extra = dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2) if penalties else {}
    if kind is not None:
        extra["output_kind"] = kind
    return SamplingParams(temperature=0.8, seed=1, max_tokens=10_000, ignore_eos=True, **extra)


def measure(engine: LLMEngine, seqs: int, context: int, steps: int, sp: SamplingParams) -> tuple[float, float]:
    """Median (step ms, model-forward ms) over `steps` decode steps of `seqs` sequences at `context`."""
    rng = random.Random(context)
    for _ in range(seqs):
        engine.add_request(None, [rng.randrange(VOCAB) for _ in range(context)], sp)
    while any(s.in_prompt for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    model, forward_time = engine.runner.model, [0.0]
    forward = model.forward

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            forward_time[0] += time.perf_counter() - t0
    model.forward = timed
    step_ms, model_ms = [], []
    try:
        for _ in range(steps):
            forward_time[0] = 0.0
            t0 = time.perf_counter()
            engine.step()
            step_ms.append(1000 * (time.perf_counter() - t0))
            model_ms.append(1000 * forward_time[0])
    finally:
        del model.forward
        for rid in list(engine.requests):
            engine.abort_request(rid)
    return statistics.median(step_ms), statistics.median(model_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--contexts", default="64,2048,6000")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-path", action="store_true", help="import tokenmill from PYTHONPATH (a baseline checkout)")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        from tokenmill.sampling_params import RequestOutputKind
        kinds = [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE]
    except ImportError:            # a baseline before output kinds: cumulative only
        kinds = [None]
    with tempfile.TemporaryDirectory() as tmp:
        tiny_model(Path(tmp), max(contexts) + 512)
        engine = LLMEngine(EngineConfig(model=tmp, max_num_seqs=args.seqs, max_num_batched_tokens=8192,
                                        num_kv_blocks=args.seqs * (max(contexts) + 256) // 16 + 64), progress=False)
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}; {args.seqs} sequences decoding, tiny Llama (2 layers, hidden 64)\n")
        measure(engine, args.seqs, contexts[0], args.steps, params(True, kinds[0]))     # warm-up, not shown
        print("| output kind | penalties | context | step ms | model ms | rest ms |")
        print("|---|---|---|---|---|---|")
        for kind in kinds:
            for penalties in (False, True):
                for context in contexts:
                    step, model = measure(engine, args.seqs, context, args.steps, params(penalties, kind))
                    name = kind.value if kind is not None else "cumulative"
                    print(f"| {name} | {'yes' if penalties else 'no'} | {context} | {step:.2f} | {model:.2f} "
                          f"| {step - model:.2f} |", flush=True)


if __name__ == "__main__":
    main()
