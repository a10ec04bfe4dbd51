"""The OpenAI wire format: request and response models for /v1/completions and /v1/chat/completions.

Requests ignore fields they do not know (clients send many); responses keep every field OpenAI
documents, `null`s included, because SDKs read them by name.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from tokenmill.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints, with OpenAI's names and defaults plus vLLM's extensions."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    use_beam_search: bool = False            # vLLM's extra parameters: n beams, returned best first
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    def _beam(self, max_tokens: int | None, logprobs: int | None) -> BeamSearchParams:
        """BeamSearchParams from the request, refusing what beam search cannot honour."""
        if self.stream:
            raise ValueError("stream: beam search cannot stream: which beams win is known only when the search "
                             "ends; send stream=false")
        sampling_only = dict(top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
                             presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                             repetition_penalty=self.repetition_penalty, stop=self.stop,
                             logit_bias=self.logit_bias, min_tokens=self.min_tokens or None)
        for name, value in sampling_only.items():
            if value is not None:
                raise ValueError(f"{name}: is not supported with use_beam_search (beam search does not sample"
                                 f"{'; use stop_token_ids' if name == 'stop' else ''})")
        if logprobs:
            raise ValueError("logprobs: beam search returns the chosen tokens' logprobs only; ask for 0 "
                             "top alternatives")
        if self.n < 1:
            raise ValueError(f"n must be >= 1 (the number of beams), got {self.n}")
        return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                temperature=self.temperature or 0.0, length_penalty=self.length_penalty,
                                early_stopping=self.early_stopping, stop_token_ids=self.stop_token_ids)

    def _sampling(self, **overrides: Any) -> SamplingParams:
        """SamplingParams from the request; it raises ValueError("<field> must be ...") on bad values.
        Outputs come as DELTAs (per-step work stays proportional to the new tokens); the handlers
        stream them or add them up."""
        given = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                     presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                     repetition_penalty=self.repetition_penalty, stop=self.stop, stop_token_ids=self.stop_token_ids,
                     include_stop_str_in_output=self.include_stop_str_in_output, seed=self.seed,
                     min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logit_bias=self._logit_bias(),
                     skip_special_tokens=self.skip_special_tokens, output_kind=RequestOutputKind.DELTA, **overrides)
        return SamplingParams(**{k: v for k, v in given.items() if v is not None or k == "max_tokens"})

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI sends token ids as JSON object keys, so as strings."""
        if not self.logit_bias:
            return None
        try:
            return {int(k): v for k, v in self.logit_bias.items()}
        except ValueError:
            raise ValueError(f"logit_bias: keys must be token ids (integers as strings), "
                             f"got {list(self.logit_bias)[:5]}") from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---- /v1/completions ---------------------------------------------------------------------------------
class CompletionRequest(_SamplingRequest):
    # StrictInt: a list of floats is an error, not a list of token ids
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = 16
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ValueError("prompt: must not be empty")
        return list(p)

    def sampling_params(self) -> SamplingParams | BeamSearchParams:
        if self.suffix is not None:
            raise ValueError("suffix: is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 unless echo is true (prompt scoring), got 0")
        if self.use_beam_search:
            if self.echo or self.best_of is not None:
                raise ValueError(f"{'echo' if self.echo else 'best_of'}: is not supported with use_beam_search")
            return self._beam(self.max_tokens, self.logprobs)
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling(max_tokens=self.max_tokens, best_of=self.best_of, logprobs=self.logprobs,
                              prompt_logprobs=prompt_logprobs)


class CompletionLogprobs(BaseModel):
    """The legacy format: parallel lists, one entry per token; null for the first prompt token."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---- /v1/chat/completions ----------------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content or [])
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"messages: content is not valid Unicode text ({e.reason} at character {e.start})") \
                from None
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def sampling_params(self) -> SamplingParams | BeamSearchParams:
        if not self.messages:
            raise ValueError("messages: must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs to be true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        for name in ("max_tokens", "max_completion_tokens"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be >= 1, got 0")
        try:
            if self.use_beam_search:
                return self._beam(max_tokens, self.top_logprobs)
            return self._sampling(max_tokens=max_tokens,
                                  logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        except ValueError as e:     # the engine's names are the completions API's; say the chat field
            msg = str(e)
            if msg.startswith("logprobs "):
                msg = "top_logprobs " + msg[len("logprobs "):]
            if msg.startswith("max_tokens ") and self.max_completion_tokens is not None:
                msg = "max_completion_tokens " + msg[len("max_tokens "):]
            raise ValueError(msg) from None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---- /v1/models -----------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tokenmill"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
