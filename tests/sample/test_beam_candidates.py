"""beam_candidates against a slow reference written from its contract: per group, the best
num_candidates (beam, token) pairs by cumulative logprob, with the token's logprob and rank."""
import torch

from tokenmill.core.beam import BeamGroup
from tokenmill.core.sequence import Sequence
from tokenmill.sample.beam import beam_candidates
from tokenmill.sampling_params import BeamSearchParams


def group(width: int, live: int, stops: int, temperature: float, gen: torch.Generator) -> BeamGroup:
    g = BeamGroup(BeamSearchParams(width, temperature=temperature), 3, 100, frozenset(range(stops)))
    g.beams = [Sequence("r", [1, 2, 3], g.params.as_sampling_params(), beam=g) for _ in range(live)]
    for b in g.beams:
        b.cumulative_logprob = float(torch.rand((), generator=gen) * -5)
    return g


def reference(logits: torch.Tensor, g: BeamGroup) -> list[tuple[int, int, float, int, float]]:
    logprobs = (logits.double() / (g.params.temperature or 1.0)).log_softmax(-1)
    cands = [(float(logprobs[b, t]) + g.beams[b].cumulative_logprob, b, t)
             for b in range(len(g.beams)) for t in range(logits.shape[1])]
    cands.sort(key=lambda c: -c[0])
    return [(b, t, float(logprobs[b, t]), int((logprobs[b] > logprobs[b, t]).sum()) + 1, s)
            for s, b, t in cands[:g.num_candidates]]


def test_beam_candidates_match_the_slow_reference():
    gen = torch.Generator().manual_seed(0)
    groups = [group(4, 1, 1, 0.0, gen), group(4, 4, 1, 0.0, gen), group(2, 2, 3, 0.7, gen), group(4, 4, 0, 1.3, gen),
              group(8, 8, 1, 0.0, gen)]
    rows = sum(len(g.beams) for g in groups)
    logits = torch.randn(rows, 50, generator=gen) * 3
    got = beam_candidates(logits, groups)
    start = 0
    for g, cands in zip(groups, got):
        expected = reference(logits[start:start + len(g.beams)], g)
        start += len(g.beams)
        assert len(cands) == g.num_candidates == len(expected)
        for c, (b, t, lp, rank, score) in zip(cands, expected):
            assert (c.beam, c.token_id, c.rank) == (b, t, rank)
            assert abs(c.logprob - lp) < 1e-5 and abs(c.score - score) < 1e-4
