"""The draw for large vocabularies: a row left with fewer than CANDIDATES tokens races over them
alone, any other row races in two rounds (blocks, then inside the winning block), and top-p looks
at geometrically more candidates before it sorts a whole row. Each is checked against the exact
law (chi-square), against what a seeded row reads from its generator, and against a full sort."""
import math

import pytest
import torch
from scipy.stats import chisquare

from tokenmill.sample.ops import CANDIDATES, apply_filters, truncate
from tokenmill.sample.sampler import Sampler, SamplerRow, block_size
from tokenmill.sampling_params import SamplingParams


def row(generator=None, **kw):
    return SamplerRow(SamplingParams(**kw), generator)


def seeded(seed, **kw):
    return row(torch.Generator().manual_seed(seed), seed=seed, **kw)


def draws(logits: torch.Tensor, r: SamplerRow, n: int, batch: int = 2000, seed: int = 1) -> torch.Tensor:
    """n tokens drawn by the Sampler for one row of logits, `batch` rows per call."""
    sampler = Sampler(torch.Generator().manual_seed(seed))
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        out += [t.token_id for t in sampler(logits.expand(m, -1), [r] * m)]
    return torch.tensor(out)


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor, pool_below: float = 5.0):
    """Chi-square of token counts against exact probs (float64); tokens expected fewer than
    `pool_below` times are pooled into one bin. Nothing outside the support may appear."""
    n, vocab = len(tokens), len(probs)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[probs == 0].sum() == 0, "a filtered token was drawn"
    expected = probs * n
    big = expected >= pool_below
    observed = counts[big].tolist() + [float(counts[~big].sum())]
    wanted = expected[big].tolist() + [float(expected[~big].sum())]
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    assert len(wanted) > 3
    stat = chisquare(observed, wanted)
    assert stat.pvalue > 1e-3, stat


def exact(logits: torch.Tensor, r: SamplerRow) -> torch.Tensor:
    """The filtered distribution in float64, on the support the float32 filters keep."""
    kept = torch.isfinite(apply_filters(logits, [r]))
    t = r.params.temperature
    return (logits.double() / t).masked_fill(~kept, float("-inf")).softmax(-1)[0]


def peaky(vocab: int, seed: int, spread: float = 1.5, boosted: int = 40) -> torch.Tensor:
    """Logits whose mass sits on `boosted` tokens scattered over the vocabulary (so over many blocks)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, vocab, generator=g) * spread
    x[0, torch.randperm(vocab, generator=g)[:boosted]] += 6 + torch.rand(boosted, generator=g) * 3
    return x


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=30), dict(temperature=0.7, top_p=0.8),
                                dict(temperature=1.3, min_p=0.01), dict(temperature=1.0, top_k=100, top_p=0.9,
                                                                         min_p=0.001)])
def test_survivor_race_follows_the_filtered_distribution(kw):
    logits = peaky(2000, seed=2)
    r = row(**kw)
    cut = truncate(logits, [r], list_survivors=True)
    assert cut.listed == [0] and 3 < cut.counts[0] < CANDIDATES          # the race over survivors alone
    assert_follows(draws(logits, r, 20000), exact(logits, r))


@pytest.mark.parametrize("vocab", [3000, 4096, 50])
def test_two_round_race_follows_the_distribution(vocab):
    """No filter: blocks first, then the winner's tokens; a vocabulary that is no multiple of the block
    has a short last block."""
    logits = peaky(vocab, seed=vocab, boosted=min(40, vocab // 2))
    r = row(temperature=0.9)
    assert truncate(logits, [r], list_survivors=True).listed == []
    tokens = draws(logits, r, 20000)
    probs = exact(logits, r)
    assert_follows(tokens, probs)
    size = block_size(vocab)                      # and per block: the first round alone
    blocks = torch.zeros(-(-vocab // size), dtype=torch.float64).index_add_(0, torch.arange(vocab) // size, probs)
    assert_follows(tokens // size, blocks)


def test_draw_follows_any_weights():
    """Sampler.draw (also the spec verifier's, on residual distributions): unnormalised weights,
    whole blocks of zeros, and a short last block."""
    vocab = 100                                      # blocks of 8, the last of 4
    g = torch.Generator().manual_seed(5)
    w = torch.rand(vocab, generator=g) ** 3
    w[8:40] = 0.0
    w[97] = 5.0
    n = 30000
    sampler = Sampler(torch.Generator().manual_seed(6))
    tokens = sampler.draw(w.expand(n, vocab).contiguous(), [row(temperature=1.0)] * n)
    assert_follows(tokens, w.double() / w.double().sum())


@pytest.mark.parametrize("tied,listed", [(200, True), (CANDIDATES - 2, True), (CANDIDATES - 1, False), (400, False)])
def test_ties_with_the_lowest_survivor_are_drawn(tied, listed):
    """top_k=2 over one top token and `tied` equal runners-up keeps them all, whether the survivors are
    listed (fewer than CANDIDATES) or raced over the whole masked row."""
    vocab = 1000
    logits = torch.zeros(1, vocab)
    g = torch.Generator().manual_seed(tied)
    ids = torch.randperm(vocab, generator=g)[:tied + 1]
    logits[0, ids[0]] = 1.0
    logits[0, ids[1:]] = 0.5
    r = row(temperature=1.0, top_k=2)
    cut = truncate(logits, [r], list_survivors=True)
    assert (cut.listed == [0]) == listed
    if listed:       # by token id: a seeded row pairs its draws with tokens alike whatever order a sort left ties in
        assert cut.ids[0].tolist() == sorted(ids.tolist())
    probs = exact(logits, r)
    assert int((probs > 0).sum()) == tied + 1
    tokens = draws(logits, r, 20000)
    # per token where counts allow it, and top token against the tied group as a whole
    assert_follows(tokens, probs, pool_below=5.0)
    top = int((tokens == ids[0]).sum())
    assert chisquare([top, len(tokens) - top], [float(probs[ids[0]]) * len(tokens),
                                                (1 - float(probs[ids[0]])) * len(tokens)]).pvalue > 1e-3


def test_top_p_ties_straddling_the_nucleus_are_drawn():
    logits = torch.full((1, 600), -5.0)
    logits[0, 7] = 3.0
    logits[0, [100, 200, 300, 400]] = 1.0            # the nucleus ends inside this tie: all four stay
    probs = logits.softmax(-1)[0]
    r = row(temperature=1.0, top_p=float(probs[7] + probs[100]) - 1e-3)
    want = exact(logits, r)
    assert (want > 0).nonzero().squeeze(1).tolist() == [7, 100, 200, 300, 400]
    assert_follows(draws(logits, r, 20000), want)


def _steps(logits: torch.Tensor, target: SamplerRow, neighbours: list[SamplerRow], position: int, steps: int = 6
           ) -> list[int]:
    sampler = Sampler(torch.Generator().manual_seed(len(neighbours)))
    rows = neighbours[:position] + [target] + neighbours[position:]
    batch = logits[torch.arange(len(rows)) % len(logits)].clone()
    batch[position] = logits[0]
    return [sampler(batch, rows)[position].token_id for _ in range(steps)]


@pytest.mark.parametrize("kw", [dict(temperature=0.9, top_k=20),               # listed
                                dict(temperature=1.0, top_p=0.9),              # listed after top-p
                                dict(temperature=1.0, min_p=0.2),              # listed after min-p
                                dict(temperature=0.8),                         # two rounds
                                dict(temperature=1.0, top_p=0.999),            # wide nucleus: two rounds, masked
                                dict(temperature=1.0, top_k=CANDIDATES + 10)])  # more survivors than listed
def test_seeded_row_reads_the_same_alone_and_in_any_batch(kw):
    """The seeded row's tokens and its generator's state after them do not depend on its neighbours:
    rows with a vocabulary of survivors, a top-k that widens everyone's candidates, a nucleus that
    makes the batch look at more candidates, other seeded rows."""
    vocab = 8000
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([peaky(vocab, seed=3), torch.randn(3, vocab, generator=g) * 0.5,
                        torch.randn(1, vocab, generator=g) * 3])
    crowds = [[],
              [row(temperature=1.0)] * 3,
              [row(temperature=1.0, top_k=5000), row(temperature=1.0, top_p=0.9999), row(temperature=0)],
              [seeded(9, temperature=1.0, top_k=3), row(temperature=1.2, min_p=1e-6), seeded(8, temperature=0.5)],
              [row(temperature=1.0, top_p=0.99)] * 4 + [row(temperature=0.7, top_k=50, top_p=0.5)]]
    results = []
    for i, crowd in enumerate(crowds):
        target = seeded(42, **kw)
        tokens = _steps(logits, target, crowd, position=i % (len(crowd) + 1))
        results.append((tokens, target.generator.get_state()))
    for tokens, state in results[1:]:
        assert tokens == results[0][0]
        assert torch.equal(state, results[0][1])
    assert _steps(logits, seeded(43, **kw), [], 0) != results[0][0]         # and the seed does matter


@pytest.mark.parametrize("kw,expected", [(dict(temperature=1.0, top_k=7), 7),
                                         (dict(temperature=1.0, top_k=2), 4),           # two ties with the 2nd
                                         (dict(temperature=0.5), None)])
def test_what_a_seeded_row_consumes(kw, expected):
    """As many float64 uniforms as survivors when they are listed, else blocks + block size."""
    vocab = 3000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(4))
    logits[0, [10, 11, 12]] = 9.0
    logits[0, 13] = 10.0
    r = seeded(7, **kw)
    Sampler(torch.Generator())(logits, [r])
    size = block_size(vocab)
    count = expected if expected is not None else -(-vocab // size) + size
    reference = torch.Generator().manual_seed(7)
    torch.rand(count, generator=reference, dtype=torch.float64)
    assert torch.equal(r.generator.get_state(), reference.get_state())


def _floor_by_full_sort(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p rule on a whole sorted row (what row_floors' ladder must reproduce)."""
    values = logits.sort(dim=-1, descending=True).values
    probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()
    keep = ((probs.cumsum(dim=-1) - probs) < top_p).sum(dim=-1, keepdim=True)
    return values.gather(1, keep - 1)


def test_top_p_widening_gives_the_full_sort_floor():
    """Nuclei of a few hundred, a few thousand, tens of thousands and most of a 150k vocabulary: each
    ladder step (256, 8192, 65536, the whole row) decides some row, and all agree with a full sort."""
    vocab = 150_000
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, vocab, generator=g) * torch.tensor([[4.0], [3.0], [2.5], [1.5], [0.3]])
    top_p = 0.95
    kept = torch.isfinite(apply_filters(logits, [row(temperature=1.0, top_p=top_p)] * len(logits)))
    sizes = kept.sum(-1).tolist()
    steps = [sum(1 for s in sizes if lo < s <= hi) for lo, hi in
             ((CANDIDATES, 8192), (8192, 65536), (65536, vocab))]
    assert all(steps), sizes
    assert torch.equal(kept, logits >= _floor_by_full_sort(logits, top_p)), sizes
    for i in range(len(logits)):                    # and alone, as in a batch
        assert torch.equal(torch.isfinite(apply_filters(logits[i:i + 1], [row(temperature=1.0, top_p=top_p)]))[0],
                           kept[i])


def test_mixed_batch_draws_each_row_from_its_own_filter():
    vocab = 4000
    logits = torch.cat([peaky(vocab, seed=s) for s in range(6)])
    rows = [row(temperature=0), row(temperature=1.0, top_k=3), seeded(1, temperature=0.8),
            row(temperature=1.0, top_p=0.999), seeded(2, temperature=1.0, min_p=0.3), row(temperature=0.5)]
    sampler = Sampler(torch.Generator().manual_seed(0))
    filtered = apply_filters(logits, rows)
    for _ in range(20):
        out = sampler(logits, rows)
        assert out[0].token_id == int(logits[0].argmax())
        for i, o in enumerate(out):
            assert math.isfinite(float(filtered[i, o.token_id]))


def test_ranks_beyond_the_top_logprobs_are_counted():
    """rank = 1 + how many raw logits exceed the chosen token's, whether the chosen token is among
    the top `logprobs` (read from them) or not (counted), ties included."""
    vocab = 500
    logits = (torch.randn(8, vocab, generator=torch.Generator().manual_seed(3)) * 2).round()   # many ties
    rows = [row(temperature=1.0, logprobs=n) for n in (0, 1, 2, 5, 0, 1, 20, 3)]
    sampler = Sampler(torch.Generator().manual_seed(0))
    seen_beyond = False
    for _ in range(10):
        out = sampler(logits, rows)
        for i, o in enumerate(out):
            assert o.rank == int((logits[i] > logits[i, o.token_id]).sum()) + 1
            seen_beyond |= o.rank > max(1, rows[i].params.logprobs)
        greedy = sampler(logits, [row(temperature=0, logprobs=0)] * 8)
        assert [o.rank for o in greedy] == [1] * 8
    assert seen_beyond
