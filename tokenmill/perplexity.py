"""Sliding-window perplexity, llama.cpp's `llama-perplexity` method: the text is cut into windows of
`ctx` tokens, each window is scored independently, and only its second half counts (every scored
token sees at least ctx / 2 tokens of context). Windows run as one batch of prompt-scoring requests.

The default text is real English that every Python ships (`pydoc_data/topics.py`): its first half is
the calibration slice for the quantizers, its second half the evaluation slice, so they never overlap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.sampling_params import SamplingParams


def reference_text(split: str) -> str:
    """"calibration" or "evaluation": disjoint halves of the Python reference's topic texts."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    half = len(text) // 2
    return text[:half] if split == "calibration" else text[half:]


@dataclass
class Perplexity:
    ppl: float
    nll: float            # mean negative log-likelihood per scored token, nats
    tokens: int           # tokens scored
    windows: int


def perplexity(llm, ids: list[int], ctx: int = 512, max_windows: int | None = None,
               use_tqdm: bool = True) -> Perplexity:
    if ctx < 4:
        raise ValueError(f"ctx must be at least 4, got {ctx}")
    n = len(ids) // ctx if max_windows is None else min(len(ids) // ctx, max_windows)
    if n < 1:
        raise ValueError(f"text: {len(ids)} tokens, fewer than one window of ctx={ctx}")
    windows = [ids[i * ctx:(i + 1) * ctx] for i in range(n)]
    outs = llm.generate(windows, SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=use_tqdm)
    nll, count = 0.0, 0
    for window, out in zip(windows, outs):
        for pos in range(ctx // 2, ctx):
            nll -= out.prompt_logprobs[pos][window[pos]].logprob
            count += 1
    return Perplexity(math.exp(nll / count), nll / count, count, n)
