"""Logit bias and the incrementally kept penalty history, against transformers' processors."""
import random

import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    SequenceBiasLogitsProcessor)

from tokenmill.sample.sampler import SamplerRow, TokenHistory, apply_penalties
from tokenmill.sampling_params import SamplingParams

V = 300


def test_logit_bias_matches_transformers_sequence_bias():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3
    biases = [{5: 10.0, 17: -100.0, 299: 0.5}, {}, {0: -3.25}]
    rows = [SamplerRow(SamplingParams(logit_bias=b)) for b in biases]
    ours = apply_penalties(logits, rows)
    for i, bias in enumerate(biases):
        theirs = logits[i:i + 1].clone()
        if bias:
            processor = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
            theirs = processor(torch.zeros(1, 1, dtype=torch.long), theirs)
        torch.testing.assert_close(ours[i:i + 1], theirs)


def test_history_grown_token_by_token_equals_the_whole_sequence():
    """Rows updated one token a step (as the runner does) give the same penalties as transformers
    over the whole prompt + output, step after step, with slots reused after release."""
    rng = random.Random(0)
    history = TokenHistory(2, V)
    for trial in range(3):
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 40))]
        output: list[int] = []
        slot = trial % 2
        history.reset(slot, prompt)
        params = SamplingParams(repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=-0.2)
        for _ in range(25):
            token = rng.randrange(V // 10)            # small range: many repeats
            output.append(token)
            history.add([slot], [[token]])
            logits = torch.randn(1, V, generator=torch.Generator().manual_seed(len(output))) * 2
            ours = apply_penalties(logits, [SamplerRow(params, history_slot=slot)], history)
            expected = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor([prompt + output]), logits.clone())
            for t in set(output):
                expected[0, t] -= 0.3 * output.count(t) - 0.2
            torch.testing.assert_close(ours, expected)
