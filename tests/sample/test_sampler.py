"""The sampler against transformers' logits processors, a dense penalty formula, and chi-square."""
import dataclasses

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from tokenmill.sample.ops import CANDIDATES
from tokenmill.sample.sampler import Sampler, SamplerRow, TokenHistory, apply_filters, apply_penalties
from tokenmill.sampling_params import SamplingParams

V = 1000


@dataclasses.dataclass
class Row(SamplerRow):
    prompt: list[int] = dataclasses.field(default_factory=list)
    output: list[int] = dataclasses.field(default_factory=list)


def row(prompt=(), output=(), suppress=None, generator=None, **kw):
    return Row(SamplingParams(**kw), generator, suppress, prompt=list(prompt), output=list(output))


def with_history(rows, vocab=V):
    """The rows with history slots 0..n-1, and a TokenHistory filled from their token lists."""
    history = TokenHistory(len(rows), vocab)
    for i, r in enumerate(rows):
        history.reset(i, r.prompt)
        history.add([i], [r.output])
    return [dataclasses.replace(r, history_slot=i) for i, r in enumerate(rows)], history


def same_support_and_probs(ours: torch.Tensor, theirs: torch.Tensor):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), atol=1e-6, rtol=1e-5)


@pytest.fixture
def logits():
    return torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("kw,processors", [
    (dict(temperature=0.7), [TemperatureLogitsWarper(0.7)]),
    (dict(temperature=1.0, top_k=17), [TopKLogitsWarper(17)]),
    (dict(temperature=1.0, top_p=0.8), [TopPLogitsWarper(0.8)]),
    (dict(temperature=1.0, min_p=0.05), [MinPLogitsWarper(0.05)]),
    (dict(temperature=1.0, top_k=CANDIDATES + 44, top_p=0.99),
     [TopKLogitsWarper(CANDIDATES + 44), TopPLogitsWarper(0.99)]),
    (dict(temperature=0.5, top_k=50, top_p=0.9, min_p=0.02),
     [TemperatureLogitsWarper(0.5), TopKLogitsWarper(50), TopPLogitsWarper(0.9), MinPLogitsWarper(0.02)]),
])
@pytest.mark.parametrize("scale", [3.0, 0.3])   # nucleus inside the top-CANDIDATES, and far wider (full sort)
def test_filters_match_transformers(logits, kw, processors, scale):
    logits = logits * scale
    ours = apply_filters(logits, [row(**kw)] * len(logits))
    ids = torch.zeros(len(logits), 1, dtype=torch.long)
    theirs = logits.clone()
    for p in processors:
        theirs = p(ids, theirs)
    same_support_and_probs(ours, theirs)


def test_top_k_keeps_ties_like_transformers():
    logits = (torch.randn(3, 200, generator=torch.Generator().manual_seed(1)) * 2).round()   # many equal logits
    ours = apply_filters(logits, [row(top_k=20)] * 3)
    theirs = TopKLogitsWarper(20)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
    same_support_and_probs(ours, theirs)
    assert (~torch.isinf(ours)).sum(-1).gt(20).any()       # the rounding did make ties at the boundary


def test_top_p_keeps_every_token_tied_with_the_last_survivor():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    top_p = float(probs[0] + probs[1]) - 1e-4              # reached by the first tied token
    kept = ~torch.isinf(apply_filters(logits, [row(top_p=top_p)]))[0]
    assert kept.tolist() == [True, True, True, True, False, False]


def test_repetition_penalty_matches_transformers(logits):
    prompt, output = [1, 5, 7, 999], [5, 42, 42, 3]
    ours = apply_penalties(logits, *with_history([row(prompt, output, repetition_penalty=1.3)] * len(logits)))
    ids = torch.tensor([prompt + output] * len(logits))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_frequency_and_presence_penalties_follow_the_openai_formula(logits):
    output = [3, 3, 3, 8, 9, 9]
    ours = apply_penalties(logits, *with_history([row([3, 100], output, frequency_penalty=0.5, presence_penalty=0.25)] * 4))
    expected = logits.clone()
    for t in set(output):                  # logit - count * frequency - (count > 0) * presence; prompt not counted
        expected[:, t] -= output.count(t) * 0.5 + 0.25
    torch.testing.assert_close(ours, expected)


def test_mixed_batch_rows_equal_rows_alone(logits):
    flat = torch.cat([logits, logits * 0.1])               # rows 4.. have a nucleus wider than CANDIDATES
    rows = [row(temperature=0.6, top_k=5, suppress=[7, 8]), row(temperature=1.0, top_p=0.5, output=[4, 4, 9],
                                                                 frequency_penalty=0.7),
            row(temperature=0, repetition_penalty=0.8, prompt=[5, 6]),
            row(temperature=1.2, min_p=0.1, repetition_penalty=1.2, prompt=[1, 2, 3], output=[2, 11]),
            row(temperature=0.9, top_p=0.95, presence_penalty=-0.5, output=[1, 1, 2]),
            row(temperature=1.0, top_k=700, top_p=0.9), row(temperature=1.5),
            row(temperature=0.7, top_k=CANDIDATES + 1, min_p=0.01, suppress=[0], output=[0, 3],
                frequency_penalty=-1.0, presence_penalty=1.0, repetition_penalty=1.1)]
    logits = flat
    batched = apply_filters(apply_penalties(logits, *with_history(rows)), rows)
    for i, r in enumerate(rows):
        alone = apply_filters(apply_penalties(logits[i:i + 1], *with_history([r])), [r])
        torch.testing.assert_close(batched[i:i + 1], alone)


def test_greedy_takes_the_lowest_id_on_ties_and_respects_suppression():
    logits = torch.zeros(2, 10)
    logits[:, [3, 7]] = 5.0
    sampler = Sampler(torch.Generator().manual_seed(0))
    out = sampler(logits, [row(temperature=0), row(temperature=0, suppress=[3])])
    assert [o.token_id for o in out] == [3, 7]


def test_suppressed_tokens_are_never_sampled():
    logits = torch.zeros(1, 5)
    logits[0, 2] = 10.0
    sampler = Sampler(torch.Generator().manual_seed(0))
    for _ in range(50):
        assert sampler(logits, [row(temperature=1.0, suppress=[2])])[0].token_id != 2


def test_logprobs_are_raw_log_softmax_with_ranks(logits):
    sampler = Sampler(torch.Generator().manual_seed(0))
    rows = [row(temperature=0.3, top_k=3, logprobs=5, repetition_penalty=1.5, prompt=list(range(50))),
            row(temperature=0, logprobs=0), row(temperature=1.0)]
    out = sampler(logits[:3], *with_history(rows))
    raw = logits[:3].log_softmax(-1)
    for i, o in enumerate(out):
        assert o.logprob == pytest.approx(raw[i, o.token_id].item(), abs=1e-6)
        if rows[i].params.logprobs is not None:
            assert o.rank == int((raw[i] > raw[i, o.token_id]).sum()) + 1
        else:
            assert o.rank == 0 and o.top_logprobs == []     # not asked for: not computed
    top = raw[0].topk(5)
    assert [t for t, _ in out[0].top_logprobs] == top.indices.tolist()
    assert [lp for _, lp in out[0].top_logprobs] == pytest.approx(top.values.tolist())
    assert out[1].top_logprobs == [] and out[1].rank == 1


def test_prompt_logprobs():
    logits = torch.randn(3, 50)
    entries = Sampler.prompt_logprobs(logits, [4, 9, 0], num_top=2)
    raw = logits.log_softmax(-1)
    for i, (lp, rank, top) in enumerate(entries):
        t = [4, 9, 0][i]
        assert lp == pytest.approx(raw[i, t].item(), abs=1e-6)
        assert rank == int((raw[i] > raw[i, t]).sum()) + 1
        assert [x for x, _ in top] == raw[i].topk(2).indices.tolist()


def test_seeded_rows_are_reproducible_in_any_batch(logits):
    def draw(position: int, neighbours: int, seed: int) -> list[int]:
        sampler = Sampler(torch.Generator().manual_seed(99 + neighbours))
        gen = torch.Generator().manual_seed(seed)
        tokens = []
        for _ in range(20):
            rows = [row(temperature=1.0) for _ in range(neighbours)]
            rows.insert(position, row(temperature=0.9, top_p=0.95, generator=gen))
            batch = logits[torch.arange(len(rows)) % 4].clone()
            batch[position] = logits[0]
            tokens.append(sampler(batch, rows)[position].token_id)
        return tokens
    a = draw(0, 0, seed=5)
    assert draw(2, 3, seed=5) == a
    assert draw(1, 1, seed=5) == a
    assert draw(0, 0, seed=6) != a


@pytest.mark.parametrize("kw,processors", [
    (dict(temperature=0.8), [TemperatureLogitsWarper(0.8)]),
    (dict(temperature=1.0, top_k=6), [TopKLogitsWarper(6)]),
    (dict(temperature=1.5, top_p=0.7), [TemperatureLogitsWarper(1.5), TopPLogitsWarper(0.7)]),
    (dict(temperature=1.0, min_p=0.15), [MinPLogitsWarper(0.15)]),
])
def test_empirical_distribution_matches_transformers(kw, processors):
    """Draws follow the distribution transformers' processors define (the reference, not our filters)."""
    vocab, draws = 24, 20000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    reference = logits.clone()
    for p in processors:
        reference = p(torch.zeros(1, 1, dtype=torch.long), reference)
    expected = reference.softmax(-1)[0].double()
    r = row(**kw)
    sampler = Sampler(torch.Generator().manual_seed(1))
    tokens = torch.tensor([o.token_id for o in sampler(logits.expand(draws, vocab), [r] * draws)])
    counts = torch.bincount(tokens, minlength=vocab).double()
    support = expected > 0
    assert counts[~support].sum() == 0                      # filtered tokens never appear
    if "top_k" in kw:
        assert int(support.sum()) == 6
    stat = chisquare(counts[support].numpy(), (expected[support] / expected[support].sum() * draws).numpy())
    assert stat.pvalue > 1e-3, stat
