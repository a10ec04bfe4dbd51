"""The tensor half of beam search: each group's best continuations over all its beams."""
from __future__ import annotations

import torch

from tokenmill.core.beam import BeamCandidate, BeamGroup


@torch.inference_mode()
def beam_candidates(logits: torch.Tensor, groups: list[BeamGroup]) -> list[list[BeamCandidate]]:
    """logits: [sum of the groups' beam counts, vocab], the groups' beams in order. Per group, its
    `num_candidates` best (beam, token) continuations by cumulative logprob, best first. Groups of
    the same shape are ranked in one batched top-k."""
    beams = [b for g in groups for b in g.beams]
    logits = logits.float()                                                # [rows, vocab]
    temperature = torch.tensor([g.params.temperature or 1.0 for g in groups for _ in g.beams])
    if (temperature != 1.0).any():
        logits = logits / temperature.to(logits.device)[:, None]
    logprobs = logits.log_softmax(dim=-1)
    cumulative = torch.tensor([b.cumulative_logprob for b in beams], dtype=torch.float32, device=logits.device)
    scores = logprobs + cumulative[:, None]
    vocab = logprobs.shape[1]
    starts, shapes, offset = [], {}, 0
    for i, g in enumerate(groups):
        width = len(g.beams)
        starts.append(offset)
        offset += width
        shapes.setdefault((width, min(g.num_candidates, width * vocab)), []).append(i)
    result: list[list[BeamCandidate]] = [[] for _ in groups]
    for (width, k), members in shapes.items():
        rows = torch.tensor([starts[i] + j for i in members for j in range(width)], device=logits.device)
        top, index = scores[rows].view(len(members), width * vocab).topk(k, dim=-1)   # [groups, k]
        beam, token = index // vocab, index % vocab
        parent_rows = rows.view(len(members), width).gather(1, beam)
        chosen = logprobs[parent_rows, token]
        for m, i in enumerate(members):
            result[i] = _with_ranks(beam[m].tolist(), token[m].tolist(), chosen[m].tolist(), top[m].tolist())
    return result


def _with_ranks(beams: list[int], tokens: list[int], logprobs: list[float], scores: list[float]) -> list[BeamCandidate]:
    # A token its beam rates higher scores higher, so it is among the candidates, ahead: the rank in the
    # beam's distribution counts the same beam's earlier candidates with a strictly larger logprob.
    out: list[BeamCandidate] = []
    for b, t, lp, s in zip(beams, tokens, logprobs, scores):
        rank = 1 + sum(1 for c in out if c.beam == b and c.logprob > lp)
        out.append(BeamCandidate(b, t, lp, rank, s))
    return out
