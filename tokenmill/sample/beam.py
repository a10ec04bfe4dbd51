"""The tensor half of beam search: each group's best continuations over all its beams."""
from __future__ import annotations

import torch

from tokenmill.core.beam import BeamCandidate, BeamGroup


@torch.inference_mode()
def beam_candidates(logits: torch.Tensor, groups: list[BeamGroup]) -> list[list[BeamCandidate]]:
    """logits: [sum of the groups' beam counts, vocab], the groups' beams in order. Per group, its
    `num_candidates` best (beam, token) continuations by cumulative logprob, best first."""
    result, start = [], 0
    for group in groups:
        width = len(group.beams)
        scaled = logits[start:start + width].float()                      # [beams, vocab]
        start += width
        if group.params.temperature > 0:
            scaled = scaled / group.params.temperature
        logprobs = scaled.log_softmax(dim=-1)
        cumulative = torch.tensor([b.cumulative_logprob for b in group.beams], dtype=torch.float32)
        scores = (logprobs + cumulative.to(logprobs.device)[:, None]).flatten()
        top, index = scores.topk(min(group.num_candidates, scores.numel()))
        vocab = logprobs.shape[1]
        beam, token = index // vocab, index % vocab
        chosen = logprobs[beam, token]
        rank = (logprobs[beam] > chosen[:, None]).sum(dim=-1) + 1
        result.append([BeamCandidate(*c) for c in zip(beam.tolist(), token.tolist(), chosen.tolist(),
                                                      rank.tolist(), top.tolist())])
    return result
