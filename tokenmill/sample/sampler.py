"""The batched sampler: one call per step over rows with different parameters.

Order per row: suppressed tokens → logit bias → repetition penalty → frequency / presence penalties →
greedy argmax, or temperature → top-k → top-p → min-p → draw. Logprobs are of the raw model distribution.

The draw is an exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) independent picks token i with
probability p_i exactly, and a seeded row's draw reads only its own generator. A row that the filters
leave with fewer than CANDIDATES tokens races over those alone (as many exponentials as survivors);
any other row races in two rounds, over blocks of about sqrt(vocab) tokens with the blocks' total
probabilities, then within the winning block, which is the same law (p_block * p_i / p_block) for
about 2 sqrt(vocab) exponentials instead of a vocabulary of them. What a seeded row takes from its
generator thus depends on its own logits and parameters only. Exponentials are -log(1 - U) of float64
uniforms: with float32 ones, U = 0 (E = 0, a win whatever the token's probability) comes once in 2^24
draws, which over 262,144 tokens would be one step in 64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill import kernels
from tokenmill.sample.ops import TokenHistory, apply_filters, apply_penalties, logsumexp, truncate
from tokenmill.sampling_params import SamplingParams

__all__ = ["SampledToken", "Sampler", "SamplerRow", "TokenHistory", "apply_filters", "apply_penalties"]


@dataclass
class SamplerRow:
    params: SamplingParams
    generator: torch.Generator | None = None      # the request's own when params.seed is set
    suppress_token_ids: list[int] | None = None   # forbidden this step (EOS / stop ids before min_tokens)
    history_slot: int | None = None               # its row in the TokenHistory, when it has penalties
    pending_token_ids: tuple[int, ...] = ()       # output tokens the history lacks yet (drafts before this position)


@dataclass
class SampledToken:
    token_id: int
    logprob: float                     # raw log-softmax, before penalties, temperature and filters
    rank: int                          # 1-based rank in the raw distribution; 0 when logprobs were not asked for
    top_logprobs: list[tuple[int, float]]


def block_size(vocab: int) -> int:
    """The two-round race's block: a power of two within a factor sqrt(2) of sqrt(vocab) (512 for
    262144, 256 for 49152)."""
    return 1 << (vocab.bit_length() // 2)


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator     # draws for every row without its own generator
        self._scratch: list[torch.Tensor | None] = [None, None]

    def _work(self, like: torch.Tensor, slot: int = 0) -> torch.Tensor | None:
        """An uninitialised tensor shaped like `like` for temporaries (two slots), kept between calls
        on the CPU, where a fresh [64, 262144] tensor costs more in page faults than the pass that
        fills it. None elsewhere: a caching allocator does the same."""
        if like.device.type != "cpu":
            return None
        held = self._scratch[slot]
        if held is None or held.numel() < like.numel() or held.dtype != like.dtype:
            held = self._scratch[slot] = torch.empty(like.numel(), dtype=like.dtype)
        return held[:like.numel()].view(like.shape)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow], history: TokenHistory | None = None
                 ) -> list[SampledToken]:
        if not rows:
            return []
        logits = logits.float()                                         # [num_rows, vocab]
        processed = apply_penalties(logits, rows, history)
        drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not drawn:
            tokens = kernels.argmax(processed)                          # the first maximum: ties go to the lowest id
        elif len(drawn) == len(rows):
            tokens = self._draw(processed, rows)
        else:
            greedy = [i for i, r in enumerate(rows) if r.params.greedy]
            tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = kernels.argmax(processed[idx])
            idx = torch.tensor(drawn, device=logits.device)
            tokens[idx] = self._draw(processed[idx], [rows[i] for i in drawn])
        return with_logprobs(logits, tokens, rows, work=self._work(logits))

    def _draw(self, logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        """One token per row of penalised logits, from its filtered distribution."""
        work = self._work(logits)
        cut = truncate(logits, rows, list_survivors=True, out=work, work=self._work(logits, slot=1))
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if cut.listed:
            tokens[torch.tensor(cut.listed, device=logits.device)] = self._draw_listed(
                cut.values, cut.ids, cut.counts, [rows[i] for i in cut.listed])
        listed = set(cut.listed)
        rest = [i for i in range(len(rows)) if i not in listed]
        if len(rest) == len(rows):
            weights = _weights(cut.scaled, cut.floor, out=work if cut.scaled is logits else cut.scaled)
            tokens = self.draw(weights, rows)
        elif rest:
            idx = torch.tensor(rest, device=logits.device)
            scaled = cut.scaled[idx]
            tokens[idx] = self.draw(_weights(scaled, cut.floor[idx], out=scaled), [rows[i] for i in rest])
        return tokens

    def _draw_listed(self, values: torch.Tensor, ids: torch.Tensor, counts: list[int], rows: list[SamplerRow]
                     ) -> torch.Tensor:
        """The race over listed survivors: values [n, width] (-inf padded), ids [n, width]; row i
        takes counts[i] exponentials."""
        weights = (values.double() - values.amax(dim=-1, keepdim=True).double()).exp()   # padding: 0
        e = torch.ones_like(weights)
        e[torch.arange(weights.shape[1], device=e.device) < torch.tensor(counts, device=e.device).unsqueeze(1)] = \
            torch.cat(self.exponentials(counts, rows, weights.device))
        return ids.gather(1, kernels.argmax(weights.div_(e)).unsqueeze(1)).squeeze(1)

    def draw(self, probs: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        """One token per row of `probs` [n, vocab] (any non-negative weights; not written), token i
        with probability probs[i] / sum(probs). Every row takes 2 sqrt(vocab) or so exponentials
        (num_blocks + block_size), whatever the batch."""
        n, vocab = probs.shape
        size = block_size(vocab)
        full, blocks = vocab - vocab % size, -(-vocab // size)
        # block totals: a float32 sum of `size` non-negative terms is within a few roundings of the
        # exact total, as each term is of its probability (a cumulative sum over the whole
        # vocabulary, as inverse-CDF sampling needs, is not: its error swamps the small probabilities)
        totals = probs[:, :full].reshape(n, -1, size).sum(dim=-1)
        if full < vocab:
            totals = torch.cat([totals, probs[:, full:].sum(dim=-1, keepdim=True)], dim=1)
        e = torch.stack(self.exponentials([blocks + size] * n, rows, probs.device))       # [n, blocks + size]
        block = totals.double().div_(e[:, :blocks]).argmax(dim=-1, keepdim=True)          # [n, 1]
        ids = block * size + torch.arange(size, device=probs.device)                     # [n, size]
        inside = probs.gather(1, ids.clamp(max=vocab - 1)).double().masked_fill_(ids >= vocab, 0.0)
        return ids.gather(1, inside.div_(e[:, blocks:]).argmax(dim=-1, keepdim=True)).squeeze(1)

    def uniforms(self, counts: list[int], rows: list[SamplerRow], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """counts[i] draws from U[0, 1) for rows[i], from its own generator when it has one."""
        shared = [n for n, r in zip(counts, rows) if r.generator is None]
        pool = iter(torch.rand(sum(shared), generator=self.generator, device=device, dtype=dtype).split(shared)
                    ) if shared else None
        return [torch.rand(n, generator=r.generator, device=device, dtype=dtype) if r.generator is not None
                else next(pool) for n, r in zip(counts, rows)]

    def exponentials(self, counts: list[int], rows: list[SamplerRow], device: torch.device) -> list[torch.Tensor]:
        """counts[i] draws from Exp(1) in float64 for rows[i], from its own generator when it has one."""
        tiny = torch.finfo(torch.float64).tiny
        # -log(1 - U), U in [0, 1): 1 - U is exact and > 0; E = 0 (U = 0, once in 2^53) would make
        # 0 / 0 = nan for a token of zero weight, and argmax would pick the nan
        return [u.neg_().log1p_().neg_().clamp_min_(tiny)
                for u in self.uniforms(counts, rows, device, dtype=torch.float64)]

    @staticmethod
    def prompt_logprobs(logits: torch.Tensor, next_token_ids: list[int], num_top: int
                        ) -> list[tuple[float, int, list[tuple[int, float]]]]:
        """Per row: the raw logprob and 1-based rank of next_token_ids[i], and the top num_top."""
        raw = logits.float().log_softmax(dim=-1)
        target = torch.tensor(next_token_ids, device=raw.device).unsqueeze(1)
        chosen = raw.gather(1, target)
        ranks = (raw > chosen).sum(dim=-1) + 1
        top_vals, top_ids = raw.topk(num_top, dim=-1)
        return [(float(chosen[i]), int(ranks[i]), list(zip(top_ids[i].tolist(), top_vals[i].tolist())))
                for i in range(raw.shape[0])]


def _weights(scaled: torch.Tensor, floor: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """exp(scaled - row max), 0 below the row's floor: the filtered distribution, unnormalised.
    Written into `out` (which may be `scaled` itself), or a new tensor when it is None."""
    cut = bool((floor > float("-inf")).any())
    top = scaled.amax(dim=-1, keepdim=True)                 # the top logit survives every filter
    if out is scaled:
        if cut:
            scaled.masked_fill_(scaled < floor, float("-inf"))
        weights = scaled.sub_(top)
    else:
        weights = torch.sub(scaled, top, out=out) if out is not None else scaled - top
        if cut:
            weights.masked_fill_(scaled < floor, float("-inf"))
    return weights.exp_()


def with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplerRow],
                  work: torch.Tensor | None = None) -> list[SampledToken]:
    """SampledTokens for `tokens` drawn from raw `logits` (one per row), with the logprobs the rows
    ask for; `work`: an optional tensor shaped like logits for the temporary."""
    # log p = logit - logsumexp: ranks and the full top-n only for the rows that ask
    lse = logsumexp(logits, work)
    chosen = logits.gather(1, tokens.unsqueeze(1))
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    ranks: dict[int, int] = {}
    tops: dict[int, list[tuple[int, float]]] = {}
    if wanted:
        idx = torch.tensor(wanted, device=logits.device)
        sub = logits if len(wanted) == len(rows) else logits[idx]
        mine = chosen[idx]
        widest = max(rows[i].params.logprobs for i in wanted)
        # rank = 1 + how many logits exceed the chosen one; they are all among the top `widest` (or
        # the top one) unless the last of those exceeds it too, and only then is the row counted
        vals, ids = sub.topk(widest, dim=-1) if widest else (sub.amax(dim=-1, keepdim=True), None)
        rank = (vals > mine).sum(dim=-1) + 1
        beyond = (vals[:, -1:] > mine).squeeze(1).nonzero().squeeze(1)
        if len(beyond):
            rank[beyond] = (sub[beyond] > mine[beyond]).sum(dim=-1) + 1
        ranks = dict(zip(wanted, rank.tolist()))
        if widest:
            vals = (vals - lse[idx]).tolist()
            ids = ids.tolist()
            for j, i in enumerate(wanted):
                n = rows[i].params.logprobs
                tops[i] = list(zip(ids[j][:n], vals[j][:n]))
    logprobs = (chosen - lse).squeeze(1).tolist()
    return [SampledToken(t, lp, ranks.get(i, 0), tops.get(i, []))
            for i, (t, lp) in enumerate(zip(tokens.tolist(), logprobs))]
