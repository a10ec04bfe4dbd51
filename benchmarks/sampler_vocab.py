"""Sampler cost with a large vocabulary: one Sampler call over a batch of logit rows, before and after.

Gemma 3 has 262,144 tokens. For each sampling setting it prints the median wall time of one
`Sampler.__call__` over `--batch` rows (64) for vocabularies of 49,152 and 262,144 tokens, on two
kinds of logits: "peaky" (randn * 3 with 8 boosted tokens per row, so that a few tokens hold nearly
all the mass, as a language model's usually do) and "randn*3" (no boost: the worst case for top-p,
whose nucleus then holds thousands of tokens). "before" is the sampler as it was (a copy of its
algorithm is kept below: softmax over the whole row, a vocabulary of `exponential_` per row, top-p
falling back to a full sort past 256 candidates); "after" is tokenmill's Sampler.

  python benchmarks/sampler_vocab.py [--batch 64] [--vocabs 49152,262144] [--repeats 3] [--no-before]

The machine is shared and noisy: before and after alternate within each repeat, so that drift
hits both alike; read the ratios rather than the absolute numbers.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import cpu_name  # noqa: E402  (benchmarks/engine.py)

from tokenmill.sample.ops import CANDIDATES, apply_filters  # noqa: E402
from tokenmill.sample.sampler import Sampler, SamplerRow  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

CASES = {
    "greedy": dict(temperature=0.0),
    "greedy + logprobs=5": dict(temperature=0.0, logprobs=5),
    "T=0.8": dict(temperature=0.8),
    "T=0.8 + top_p=0.95": dict(temperature=0.8, top_p=0.95),
    "T=1 + top_k=50": dict(temperature=1.0, top_k=50),
    "T=0.8 + min_p=0.05": dict(temperature=0.8, min_p=0.05),
    "seeded T=0.8 + top_p=0.95": dict(temperature=0.8, top_p=0.95, seed=0),
}


# ---- the sampler before: its algorithm as it was (no penalties: the benchmark uses none) ----

def _floor_before(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, full_sort: bool = False):
    n, vocab = logits.shape
    k_on = top_k < vocab
    width = vocab if full_sort else min(vocab, max(CANDIDATES, int(top_k[k_on].max()) if k_on.any() else 0))
    values = (logits.sort(dim=-1, descending=True) if width == vocab else logits.topk(width, dim=-1)).values
    kth = values.gather(1, (top_k.clamp(max=width) - 1).unsqueeze(1)).masked_fill(~k_on.unsqueeze(1), -float("inf"))
    p_on = top_p < 1.0
    if not p_on.any():
        return kth
    lse = logits.masked_fill(logits < kth, -float("inf")).logsumexp(dim=-1, keepdim=True)
    probs = (values - lse).exp().masked_fill(values < kth, 0.0)
    before = probs.cumsum(dim=-1) - probs
    keep = (before < top_p.masked_fill(~p_on, 2.0)).sum(dim=-1, keepdim=True)
    floor = torch.maximum(kth, values.gather(1, keep - 1))
    unsure = (keep == width).squeeze(1) & ~k_on & (width < vocab)
    if unsure.any():
        redo = unsure.nonzero().squeeze(1)
        floor[redo] = _floor_before(logits[redo], top_k[redo], top_p[redo], full_sort=True)
    return floor


def _filters_before(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    vocab = logits.shape[1]
    per_row = lambda v: torch.tensor(v, dtype=logits.dtype).unsqueeze(1)  # noqa: E731
    temps = [r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows]
    if any(t != 1.0 for t in temps):
        logits = logits / per_row(temps)
    truncate = [i for i, r in enumerate(rows) if 0 < r.params.top_k < vocab or r.params.top_p < 1.0]
    if truncate:
        idx = torch.tensor(truncate)
        sub = logits[idx]
        top_k = torch.tensor([k if 0 < (k := rows[i].params.top_k) < vocab else vocab for i in truncate])
        floor = _floor_before(sub, top_k, per_row([rows[i].params.top_p for i in truncate]))
        logits = logits.index_put((idx,), sub.masked_fill(sub < floor, -float("inf")))
    min_p = [i for i, r in enumerate(rows) if r.params.min_p > 0]
    if min_p:
        idx = torch.tensor(min_p)
        sub = logits[idx]
        floor = sub.max(dim=-1, keepdim=True).values + per_row([math.log(rows[i].params.min_p) for i in min_p])
        logits = logits.index_put((idx,), sub.masked_fill(sub < floor, -float("inf")))
    return logits


class SamplerBefore:
    """Sampler.__call__ before: full-row softmax, a vocabulary of exponentials per row, full sorts."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> list:
        logits = logits.float()
        if all(r.params.greedy for r in rows):
            tokens = logits.argmax(dim=-1)
        else:
            probs = _filters_before(logits, rows).softmax(dim=-1)
            q = torch.empty_like(probs)
            shared = [i for i, r in enumerate(rows) if r.generator is None]
            if len(shared) == len(rows):
                q.exponential_(generator=self.generator)
            else:
                for i, r in enumerate(rows):
                    q[i].exponential_(generator=r.generator or self.generator)
            tokens = probs.div_(q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)
        lse = logits.logsumexp(dim=-1, keepdim=True)
        chosen = logits.gather(1, tokens.unsqueeze(1))
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        tops = ranks = []
        if wanted:
            sub = logits[torch.tensor(wanted)]
            ranks = ((sub > chosen[wanted]).sum(dim=-1) + 1).tolist()
            widest = max(rows[i].params.logprobs for i in wanted)
            if widest:
                vals, ids = sub.topk(widest, dim=-1)
                tops = list(zip(ids.tolist(), (vals - lse[wanted]).tolist()))
        return list(zip(tokens.tolist(), (chosen - lse).squeeze(1).tolist())) + [ranks, tops]


# ---- the measurement ----

def make_logits(kind: str, batch: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(batch, vocab, generator=g) * 3
    if kind == "peaky":
        boosted = torch.randint(vocab, (batch, 8), generator=g)
        x.scatter_(1, boosted, x.amax(dim=-1, keepdim=True) + 2 + 6 * torch.rand(batch, 8, generator=g))
    return x


def rows_for(kw: dict, batch: int) -> list[SamplerRow]:
    if kw.get("seed") is None:
        return [SamplerRow(SamplingParams(**kw))] * batch
    return [SamplerRow(SamplingParams(**{**kw, "seed": i}), torch.Generator().manual_seed(i)) for i in range(batch)]


def time_call(sampler, logits: torch.Tensor, rows: list[SamplerRow]) -> float:
    start = time.perf_counter()
    sampler(logits, rows)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocabs", default="49152,262144")
    ap.add_argument("--kinds", default="peaky,randn*3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-before", action="store_true", help="time the current sampler only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}, median ms per Sampler call of {args.repeats}\n")
    header = f"{'case':28s} {'logits':8s} {'vocab':>7s} {'survivors':>9s} {'before':>9s} {'after':>9s} {'speedup':>7s}"
    print(header)
    print("-" * len(header))
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        for kind in args.kinds.split(","):
            logits = make_logits(kind, args.batch, vocab)
            for name, kw in CASES.items():
                rows = rows_for(kw, args.batch)
                survivors = "" if kw["temperature"] == 0 else \
                    f"{float(torch.isfinite(apply_filters(logits, rows)).sum(dim=-1).float().mean()):9.0f}"
                after = Sampler(torch.Generator().manual_seed(0))
                before = SamplerBefore(torch.Generator().manual_seed(0))
                after(logits, rows_for(kw, args.batch))                          # warm: its work buffer
                t_after, t_before = [], []
                for _ in range(args.repeats):
                    if not args.no_before:
                        t_before.append(time_call(before, logits, rows_for(kw, args.batch)))
                    t_after.append(time_call(after, logits, rows_for(kw, args.batch)))
                a = statistics.median(t_after) * 1e3
                b = statistics.median(t_before) * 1e3 if t_before else float("nan")
                print(f"{name:28s} {kind:8s} {vocab:7d} {survivors:>9s} {b:9.1f} {a:9.1f} {b / a:6.1f}x", flush=True)


if __name__ == "__main__":
    main()
