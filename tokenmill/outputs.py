"""What a request gives back: RequestOutput with one CompletionOutput per sample."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]     # one {token id: Logprob} per generated token
PromptLogprobs = list[dict[int, Logprob] | None]  # first entry None: nothing precedes the first token


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None     # "stop" | "length" | "abort" (also on error) | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    score: float | None = None            # beam search: cumulative_logprob / len(token_ids) ** length_penalty

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpecDecodeStats:
    """Speculative decoding counts: per request (RequestMetrics.spec_decode) and engine-wide."""
    num_drafts: int = 0                   # verification steps that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)    # drafts at position 1, 2, ... of a step
    accepted_per_position: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        if not num_draft_tokens:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for counts, n in ((self.drafted_per_position, num_draft_tokens), (self.accepted_per_position, num_accepted)):
            counts.extend([0] * (n - len(counts)))
            for i in range(n):
                counts[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verification step emits on average: the accepted drafts and one more."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def summary(self) -> str:
        per_position = ", ".join(f"{r:.2f}" for r in self.acceptance_per_position)
        return (f"speculative decoding: {self.num_accepted_tokens}/{self.num_draft_tokens} drafts accepted "
                f"({self.acceptance_rate:.1%}), mean acceptance length {self.mean_acceptance_length:.2f}, "
                f"per position [{per_position}]")


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    spec_decode: SpecDecodeStats | None = None     # set when the engine speculates


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = field(default=None, repr=False)
    error: str | None = None       # set when this request failed inside a step (the others carried on)


@dataclass
class BeamSearchSequence:
    """One returned beam (vLLM's BeamSearchSequence, with the output alone in `token_ids`)."""
    token_ids: list[int]                  # generated tokens, the stop token included
    prompt_token_ids: list[int]
    text: str
    cumulative_logprob: float
    score: float                          # what orders the beams: cumulative_logprob / len ** length_penalty
    logprobs: SampleLogprobs
    finish_reason: str
    stop_reason: int | None = None

    @property
    def tokens(self) -> list[int]:        # vLLM's: prompt and output
        return self.prompt_token_ids + self.token_ids

    @property
    def cum_logprob(self) -> float:       # vLLM's name
        return self.cumulative_logprob


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]   # best first

    @classmethod
    def from_request_output(cls, out: RequestOutput) -> "BeamSearchOutput":
        return cls([BeamSearchSequence(c.token_ids, out.prompt_token_ids, c.text, c.cumulative_logprob, c.score,
                                       c.logprobs, c.finish_reason, c.stop_reason) for c in out.outputs])
