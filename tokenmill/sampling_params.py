"""SamplingParams: what a request asks of the sampler and the stop checks, validated up front.

Limits that depend on the model (token ids within the vocabulary, n within `max_num_seqs`) are
checked by the engine when the request is added (`LLMEngine.check_params`)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0          # OpenAI's bound: -100 bans a token, +100 all but forces it
MIN_TEMPERATURE = 1e-5          # below this, logits / t overflows float32: use 0 (greedy) instead
SEED_RANGE = (-2**63, 2**63 - 1)  # what torch.Generator.manual_seed takes


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"   # every output holds everything so far
    DELTA = "delta"             # every output holds only what is new since the last one (streaming)
    FINAL_ONLY = "final_only"   # one output, when the request finishes (offline, non-streaming)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                       # -1 or 0: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16           # 0: score the prompt only (with prompt_logprobs), generate nothing
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit before sampling
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        self._check()

    def _check(self) -> None:
        def bad(name: str, limit: str, value: object = None) -> None:
            raise ValueError(f"{name} must be {limit}, got {value if value is not None else getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            bad("n", "an integer >= 1")
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of < self.n):
            bad("best_of", f"an integer >= n ({self.n})")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not _is_number(getattr(self, name)):
                bad(name, "a finite number")
        if self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            bad("temperature", f"0 (greedy) or >= {MIN_TEMPERATURE}")
        if not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "-1 or 0 (disabled) or an integer >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "in [-2, 2]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "> 0")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            bad("max_tokens", "an integer >= 0")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                bad(name, f"an integer in [0, {MAX_LOGPROBS}]")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            bad("seed", "an integer in [-2**63, 2**63 - 1]")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad("stop", "a non-empty string or a list of non-empty strings")
        for s in self.stop_strings:
            if not _utf8(s):
                bad("stop", "valid Unicode text (no lone surrogates)", s.encode("utf-8", "backslashreplace").decode())
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of non-negative integers")
        for token, bias in (self.logit_bias or {}).items():
            if not _is_int(token) or token < 0:
                bad("logit_bias", "a map from non-negative token ids to numbers", token)
            if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                bad("logit_bias", f"a map to numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", {token: bias})
        if not isinstance(self.output_kind, RequestOutputKind):
            bad("output_kind", f"one of {[k.name for k in RequestOutputKind]}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class BeamSearchParams:
    """Beam search (vLLM's names), scored as transformers' `generate(num_beams=beam_width,
    do_sample=False)`: finished beams rank by sum of logprobs / generated_len ** length_penalty.

    `temperature` > 0 scales the logits before the log-softmax that scores them (0 or 1: unscaled).
    `early_stopping` is transformers': True stops when `beam_width` beams are finished, False when
    no running beam can still beat the worst finished one at its current length, "never" when none
    can at any length. `stop_token_ids` end a beam like EOS does."""
    beam_width: int
    max_tokens: int | None = 16
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop_token_ids: list[int] | None = None
    output_kind = RequestOutputKind.FINAL_ONLY     # beams are final only when the search ends

    def __post_init__(self) -> None:
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 for beam search, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (unscaled) or >= {MIN_TEMPERATURE}, got {self.temperature!r}")
        if not _is_number(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")

    def as_sampling_params(self) -> SamplingParams:
        """What each beam's Sequence carries for the scheduler's generic checks."""
        return SamplingParams(temperature=0.0, max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                              stop_token_ids=self.stop_token_ids)
