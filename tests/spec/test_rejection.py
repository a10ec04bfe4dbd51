"""The rejection verifier against a slow reference written from the rule, and the property it exists
for: drafts drawn from q, verified against p, come out distributed as p."""
import math

import pytest
import torch
from scipy.stats import chisquare

from tokenmill.sample.ops import TokenHistory
from tokenmill.sample.sampler import Sampler, SamplerRow
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec import rejection
from tokenmill.spec.rejection import DraftSpan, verify

V = 5


def reference_law(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int]) -> dict[tuple[int, ...], float]:
    """Probability of each emitted token list (accepted drafts + one), straight from the rule, in float64."""
    law: dict[tuple[int, ...], float] = {}
    reach = 1.0
    for m in range(len(drafts) + 1):
        if m == len(drafts):
            for y in range(V):
                law[tuple(drafts) + (y,)] = law.get(tuple(drafts) + (y,), 0.0) + reach * float(p[m, y])
            break
        x = drafts[m]
        qx = float(q[m, x]) if q is not None else 1.0
        accept = min(1.0, float(p[m, x]) / qx)
        qm = q[m] if q is not None else torch.nn.functional.one_hot(torch.tensor(x), V).double()
        residual = (p[m] - qm).clamp(min=0)
        residual = residual / residual.sum()
        for y in range(V):
            key = tuple(drafts[:m]) + (y,)
            law[key] = law.get(key, 0.0) + reach * (1 - accept) * float(residual[y])
        reach *= accept
    return law


def distributions(seed: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(k + 1, V, generator=g, dtype=torch.float64).pow(3).softmax(-1) ** 2
    q = torch.rand(k, V, generator=g, dtype=torch.float64).pow(3).softmax(-1) ** 2
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def run(p: torch.Tensor, q: torch.Tensor | None, drafts_per_span: list[list[int]], seed=0, **params):
    """verify() over one span per draft list, every span with the same p (as logits) and q."""
    k = p.shape[0] - 1
    n = len(drafts_per_span)
    logits = p.log().float().repeat(n, 1)
    rows = [SamplerRow(SamplingParams(temperature=1.0, **params))] * (n * (k + 1))
    spans = [DraftSpan(i * (k + 1), d, q.float() if q is not None else None) for i, d in enumerate(drafts_per_span)]
    return verify(Sampler(torch.Generator().manual_seed(seed)), logits, rows, spans)


def chi_square(observed: dict, law: dict, n: int) -> float:
    keys = [key for key, prob in law.items() if prob > 0]
    assert set(observed) <= set(keys), set(observed) - set(keys)
    expected = [law[key] * n for key in keys]
    return chisquare([observed.get(key, 0) for key in keys], expected).pvalue


@pytest.mark.parametrize("k,with_q", [(1, True), (3, True), (3, False)])
def test_fixed_drafts_follow_the_rule(k, with_q):
    p, q = distributions(k, k)
    drafts = [1, 3, 0][:k]
    n = 10000
    out = run(p, q if with_q else None, [drafts] * n, seed=k)
    observed: dict[tuple[int, ...], int] = {}
    for tokens in out:
        key = tuple(t.token_id for t in tokens)
        observed[key] = observed.get(key, 0) + 1
    assert chi_square(observed, reference_law(p, q if with_q else None, drafts), n) > 1e-3


def test_drafts_from_q_come_out_as_p():
    k, n = 2, 12000
    p_cond, q = distributions(7, k)
    g = torch.Generator().manual_seed(1)
    drafts = [torch.multinomial(q.float(), 1, generator=g).squeeze(1).tolist() for _ in range(n)]
    out = run(p_cond, q, drafts, seed=2)
    first = [tokens[0].token_id for tokens in out]
    counts = torch.bincount(torch.tensor(first), minlength=V).tolist()
    assert chisquare(counts, (p_cond[0] * n).tolist()).pvalue > 1e-3


def test_always_accepting_is_caught(monkeypatch):
    """The same check has the power to see a draft-biased rule."""
    monkeypatch.setattr(rejection, "accept_probability", lambda p, q: torch.ones_like(p))
    k, n = 2, 12000
    p_cond, q = distributions(7, k)
    g = torch.Generator().manual_seed(1)
    drafts = [torch.multinomial(q.float(), 1, generator=g).squeeze(1).tolist() for _ in range(n)]
    first = [tokens[0].token_id for tokens in run(p_cond, q, drafts, seed=2)]
    counts = torch.bincount(torch.tensor(first), minlength=V).tolist()
    assert chisquare(counts, (p_cond[0] * n).tolist()).pvalue < 1e-6


def test_greedy_accepts_while_the_draft_is_the_argmax():
    logits = torch.tensor([[0., 3, 1, 0, 0], [5, 0, 0, 0, 0], [0, 0, 0, 4, 0], [0, 0, 0, 0, 1]])
    rows = [SamplerRow(SamplingParams(temperature=0.0, logprobs=1))] * 4
    out = verify(Sampler(torch.Generator()), logits, rows, [DraftSpan(0, [1, 0, 2], None)])[0]
    assert [t.token_id for t in out] == [1, 0, 3]       # the third draft is not the argmax: 3 replaces it
    want = logits.log_softmax(-1)
    assert [t.logprob for t in out] == pytest.approx([float(want[0, 1]), float(want[1, 0]), float(want[2, 3])], abs=1e-6)
    assert [t.rank for t in out] == [1, 1, 1]
    out = verify(Sampler(torch.Generator()), logits, rows, [DraftSpan(0, [1, 0, 3], None)])[0]
    assert [t.token_id for t in out] == [1, 0, 3, 4]    # all accepted, then the bonus token


def test_penalties_see_the_drafts_before_each_position():
    """A presence penalty at position j counts drafts 1..j, exactly as plain decoding would."""
    history = TokenHistory(1, V)
    history.reset(0, [])
    params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    logits = torch.tensor([[0., 3, 0, 0, 0], [0, 2.5, 1, 0, 0], [0, 2.5, 1, 0, 0]])
    rows = [SamplerRow(params, history_slot=0, pending_token_ids=tuple([1, 1][:j])) for j in range(3)]
    out = verify(Sampler(torch.Generator()), logits, rows, [DraftSpan(0, [1, 1], None)], history)[0]
    assert [t.token_id for t in out] == [1, 2]      # with token 1 present, 2.5 - 2 < 1: the second draft fails


def test_seeded_rows_draw_the_same_whatever_the_batch():
    p, q = distributions(3, 3)
    k = 3

    def seeded(n_others):
        gen = torch.Generator().manual_seed(42)
        logits = p.log().float().repeat(n_others + 1, 1)
        rows = ([SamplerRow(SamplingParams(temperature=1.0))] * (k + 1) * n_others
                + [SamplerRow(SamplingParams(temperature=1.0, seed=5), gen)] * (k + 1))
        spans = [DraftSpan(i * (k + 1), [1, 3, 0], q.float()) for i in range(n_others + 1)]
        sampler = Sampler(torch.Generator().manual_seed(n_others))
        return [[t.token_id for t in verify(sampler, logits, rows, spans)[-1]] for _ in range(20)]

    assert seeded(0) == seeded(5)


def test_law_of_the_reference_sums_to_one():
    p, q = distributions(0, 3)
    assert math.isclose(sum(reference_law(p, q, [1, 3, 0]).values()), 1.0, rel_tol=1e-9)
    assert math.isclose(sum(reference_law(p, None, [1, 3, 0]).values()), 1.0, rel_tol=1e-9)
