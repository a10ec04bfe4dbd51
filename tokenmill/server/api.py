"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncEngine.

Every request is validated here (model name, fields, tokenization, context room, capacity) before
it reaches the engine thread, so bad input is a 400 and never a 500. Errors use OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import tokenmill
from tokenmill.engine import LLMEngine
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput, SpecDecodeStats
from tokenmill.sampling_params import BeamSearchParams, SamplingParams
from tokenmill.server.async_engine import (AsyncEngine, EngineDeadError, EngineThread, QueueFullError,
                                           RequestFailedError, RequestStream, StepObserver)
from tokenmill.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChoiceLogprobs, CompletionChoice, CompletionChunk, CompletionLogprobs,
    CompletionRequest, CompletionResponse, DeltaMessage, ErrorInfo, ErrorResponse, ModelCard, ModelList,
    TokenLogprob, TopLogprob, Usage)

logger = logging.getLogger("tokenmill.server")

# OpenAI's own types: client mistakes (bad field, key, model) are all "invalid_request_error"
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def bad_request(e: ValueError) -> APIError:
    """Our ValueErrors start with the field: "prompt: ..." or "temperature must be ..."."""
    msg = str(e)
    head = msg.split(" ", 1)[0].rstrip(":")
    return APIError(400, msg, param=head if head.isidentifier() else None)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "error"), param=param,
                                         code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ---- metrics --------------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics(StepObserver):
    """Prometheus series in a registry of their own (no global state); fed by the engine thread."""

    def __init__(self, async_engine_stats, model_name: str, num_speculative_tokens: int = 0):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self.ttft = Histogram("tokenmill_time_to_first_token_seconds", "Arrival to first token", ["model_name"],
                              buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.itl = Histogram("tokenmill_inter_token_latency_seconds", "Time between output tokens", ["model_name"],
                             buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("tokenmill_e2e_request_latency_seconds", "Arrival to last token", ["model_name"],
                             buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens admitted", ["model_name"],
                                     registry=r).labels(**labels)
        self.generation_tokens = Counter("tokenmill_generation_tokens", "Tokens generated", ["model_name"],
                                         registry=r).labels(**labels)
        self.finished = Counter("tokenmill_request_success", "Finished requests", ["model_name", "finished_reason"],
                                registry=r)
        self.model_name = model_name
        for name, doc, read in [
                ("tokenmill_num_requests_running", "Sequences in the running batch", lambda s: s.num_running),
                ("tokenmill_num_requests_waiting", "Sequences waiting to be scheduled", lambda s: s.num_waiting),
                ("tokenmill_kv_cache_usage_perc", "Fraction of KV pages in use (0-1)", lambda s: s.kv_usage),
                ("tokenmill_prefix_cache_hit_rate", "Prefix-cache hit rate over all lookups (0-1)",
                 lambda s: s.prefix_cache_hit_rate)]:
            g = Gauge(name, doc, ["model_name"], registry=r).labels(**labels)
            g.set_function(lambda read=read: float(read(async_engine_stats())))
        if num_speculative_tokens:
            self._spec_series(async_engine_stats, labels, num_speculative_tokens)

    def _spec_series(self, stats, labels: dict[str, str], k: int) -> None:
        """Speculative decoding totals (engine-wide, since start) and acceptance per draft position."""
        def read(attr):
            return lambda: float(getattr(stats().spec_decode or SpecDecodeStats(), attr))
        for name, doc, attr in [
                ("tokenmill_spec_decode_num_drafts", "Verification steps that carried drafts", "num_drafts"),
                ("tokenmill_spec_decode_num_draft_tokens", "Draft tokens proposed and verified", "num_draft_tokens"),
                ("tokenmill_spec_decode_num_accepted_tokens", "Draft tokens accepted", "num_accepted_tokens"),
                ("tokenmill_spec_decode_acceptance_rate", "Accepted / draft tokens (0-1)", "acceptance_rate"),
                ("tokenmill_spec_decode_mean_acceptance_length", "Tokens emitted per verification step",
                 "mean_acceptance_length")]:
            Gauge(name, doc, ["model_name"], registry=self.registry).labels(**labels).set_function(read(attr))
        per_position = Gauge("tokenmill_spec_decode_acceptance_per_position", "Acceptance rate of the i-th draft",
                             ["model_name", "position"], registry=self.registry)
        for i in range(k):
            per_position.labels(position=str(i + 1), **labels).set_function(
                lambda i=i: (rates[i] if i < len(rates := (stats().spec_decode or SpecDecodeStats())
                                                 .acceptance_per_position) else 0.0))

    def on_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.inc(num_tokens)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_tokens(self, num_tokens: int, inter_token_seconds: float | None) -> None:
        self.generation_tokens.inc(num_tokens)
        if inter_token_seconds is not None:
            self.itl.observe(inter_token_seconds)

    def on_finished(self, seconds: float, reasons: list[str | None]) -> None:
        self.e2e.observe(seconds)
        for reason in reasons:
            self.finished.labels(model_name=self.model_name, finished_reason=str(reason)).inc()


# ---- the app --------------------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_queued_requests: int | None = None
    disconnect_poll_s: float = 0.5


def build_app(engine: LLMEngine, config: ServerConfig, engine_thread: EngineThread | None = None) -> FastAPI:
    """`engine_thread`: the thread that built `engine`, which then steps it too (see EngineThread)."""
    async_engine = AsyncEngine(engine, config.max_queued_requests, thread=engine_thread)
    metrics = Metrics(lambda: async_engine.stats, config.served_model_name,
                      engine.spec.num_speculative_tokens if engine.spec is not None else 0)
    async_engine.observer = metrics
    handlers = _Handlers(engine, async_engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        await async_engine.stop()
        engine.shutdown()           # the tensor-parallel ranks, before uvicorn re-raises SIGTERM

    def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    # a dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware hides client disconnects
    app = FastAPI(title="tokenmill", version=tokenmill.__version__, lifespan=lifespan)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
    app.state.async_engine = async_engine
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON in the request body: {err.get('ctx', {}).get('error', '')}")
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return error_response(400, f"{where}: {err.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}")

    @app.get("/health")
    async def health():
        if not async_engine.is_alive:
            return error_response(503, "the engine loop is not running")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": tokenmill.__version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models():
        return ModelList(data=[handlers.model_card()]).model_dump()

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        handlers.check_model(model_id)
        return handlers.model_card().model_dump()

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await handlers.completions(body, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await handlers.chat(body, request)

    app.include_router(v1)
    return app


class ClientGone(Exception):
    pass


class _Handlers:
    def __init__(self, engine: LLMEngine, async_engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.async_engine = async_engine
        self.config = config
        self.created = int(time.time())

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.config.served_model_name, created=self.created, root=self.config.served_model_name,
                         max_model_len=self.engine.max_model_len)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                                f"{self.config.served_model_name!r}", param="model", code="model_not_found")

    # ---- validation shared by both endpoints --------------------------------------------------------
    def _admit(self, prompts: list[str | list[int]], params: SamplingParams | BeamSearchParams,
               token_ids: list[list[int]] | None = None) -> list[list[int]]:
        try:
            ids = token_ids or [self.engine.tokenize(p) for p in prompts]
            self.engine.check_params(params)
        except ValueError as e:
            if str(e).startswith("beam_width"):      # the request's name for it
                e = ValueError("n" + str(e)[len("beam_width"):])
            raise bad_request(e) from None
        limit = self.engine.max_model_len
        for t in ids:
            if params.max_tokens is not None and len(t) + params.max_tokens > limit:
                raise APIError(400, f"max_tokens: the prompt ({len(t)} tokens) plus max_tokens ({params.max_tokens}) "
                                    f"exceed the context length ({limit}); lower max_tokens or shorten the prompt",
                               param="max_tokens")
        try:
            self.async_engine.check_capacity(len(ids))
        except QueueFullError as e:
            raise APIError(503, str(e), code="queue_full") from None
        return ids

    def _start(self, request_id: str, prompts: list[str | list[int]], ids: list[list[int]],
               params: SamplingParams | BeamSearchParams) -> list[RequestStream]:
        streams = []
        try:
            for i, (p, t) in enumerate(zip(prompts, ids)):
                streams.append(self.async_engine.submit(f"{request_id}-{i}", p, t, params))
        except EngineDeadError as e:
            for s in streams:
                s.close()
            raise APIError(503, str(e), code="engine_dead") from None
        return streams

    async def _merge(self, streams: list[RequestStream], request: Request | None
                     ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) from every stream, as they come; closing aborts the unfinished.
        With `request`, polls for a client disconnect (streaming responses get that from Starlette)."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    merged.put_nowait((i, out))
                merged.put_nowait((i, None))
            except Exception as e:     # noqa: BLE001 -- handed to the consumer below
                merged.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        poll = self.config.disconnect_poll_s
        try:
            remaining, next_poll = len(streams), time.monotonic() + poll
            while remaining:
                try:
                    i, item = await asyncio.wait_for(merged.get(), timeout=poll)
                except asyncio.TimeoutError:
                    i, item = -1, None
                if request is not None and time.monotonic() >= next_poll:
                    if await request.is_disconnected():
                        raise ClientGone()
                    next_poll = time.monotonic() + poll
                if i < 0:
                    continue
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                s.close()

    async def _collect(self, streams: list[RequestStream], request: Request) -> list[RequestOutput]:
        """The whole of each request, added up from its DELTA outputs."""
        finals: list[RequestOutput | None] = [None] * len(streams)
        merged = self._merge(streams, request)
        try:
            async for i, out in merged:
                finals[i] = out if finals[i] is None else _add_delta(finals[i], out)
        except ValueError as e:      # the engine refused the request after all
            raise bad_request(e) from None
        except RequestFailedError as e:
            raise APIError(500, f"the request failed in the engine: {e}", code="request_failed") from None
        except EngineDeadError as e:
            raise APIError(503, str(e), code="engine_dead") from None
        finally:
            await merged.aclose()
        return finals

    def _sse(self, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except ValueError as e:
                err = bad_request(e)
                yield f"data: {json.dumps(ErrorResponse(error=ErrorInfo(message=err.message, type=ERROR_TYPES[400], param=err.param)).model_dump())}\n\n"
            except Exception as e:     # noqa: BLE001 -- headers are sent: report in-band
                logger.exception("stream failed")
                yield f"data: {json.dumps(ErrorResponse(error=ErrorInfo(message=str(e), type=ERROR_TYPES[500])).model_dump())}\n\n"
            finally:
                await chunks.aclose()
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _finish_reason(self, reason: str | None) -> str | None:
        return None if reason is None else ("stop" if reason == "abort" else reason)

    # ---- /v1/completions -----------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        try:
            params = body.sampling_params()
            prompts = body.prompts()
        except ValueError as e:
            raise bad_request(e) from None
        if body.stream and isinstance(params, SamplingParams) and params.best_of is not None and params.best_of > params.n:
            raise APIError(400, "best_of: must equal n when streaming", param="best_of")
        ids = self._admit(prompts, params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self._start(request_id, prompts, ids, params)
        prompt_texts = [self._prompt_text(p, t) for p, t in zip(prompts, ids)] if body.echo else None
        if body.stream:
            return self._sse(self._completion_chunks(body, request_id, streams, ids, prompt_texts))
        try:
            finals = await self._collect(streams, request)
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                text, logprobs = c.text, None
                if body.logprobs is not None:
                    records, token_ids = list(c.logprobs or []), list(c.token_ids)
                    if body.echo:
                        records, token_ids = list(out.prompt_logprobs or [None] * len(ids[i])) + records, \
                            list(ids[i]) + token_ids
                    logprobs = self._legacy_logprobs(records, token_ids)
                if body.echo:
                    text = prompt_texts[i] + text
                choices.append(CompletionChoice(index=i * body.n + c.index, text=text, logprobs=logprobs,
                                                finish_reason=self._finish_reason(c.finish_reason),
                                                stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, model=self.config.served_model_name, choices=choices,
                                  usage=self._usage(ids, self._num_generated(finals))).model_dump()

    async def _completion_chunks(self, body: CompletionRequest, request_id: str, streams: list[RequestStream],
                                 ids: list[list[int]], prompt_texts: list[str] | None) -> AsyncIterator[dict]:
        n, created, model = body.n, int(time.time()), self.config.served_model_name
        echoed: set[tuple[int, int]] = set()
        prompt_records: dict[int, list] = {}
        completion_tokens = 0
        merged = self._merge(streams, None)
        try:
            async for i, out in merged:
                if out.prompt_logprobs is not None:
                    prompt_records[i] = out.prompt_logprobs
                choices = []
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    text, records, token_ids = c.text, list(c.logprobs or []), list(c.token_ids)
                    if prompt_texts is not None and (i, c.index) not in echoed:
                        echoed.add((i, c.index))
                        text = prompt_texts[i] + text
                        if body.logprobs is not None:
                            records = list(prompt_records.get(i) or [None] * len(ids[i])) + records
                            token_ids = list(ids[i]) + token_ids
                    if not text and not c.finish_reason and not token_ids:
                        continue
                    logprobs = self._legacy_logprobs(records, token_ids) if body.logprobs is not None else None
                    choices.append(CompletionChoice(index=i * n + c.index, text=text, logprobs=logprobs,
                                                    finish_reason=self._finish_reason(c.finish_reason),
                                                    stop_reason=c.stop_reason))
                if choices:
                    yield CompletionChunk(id=request_id, created=created, model=model, choices=choices).model_dump()
        finally:
            await merged.aclose()
        if body.include_usage:
            yield CompletionChunk(id=request_id, created=created, model=model, choices=[],
                                  usage=self._usage(ids, completion_tokens)).model_dump()

    def _prompt_text(self, prompt: str | list[int], ids: list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        tok = self.engine.tokenizer
        return tok.decode(ids, skip_special_tokens=False) if tok else ""

    def _token_str(self, token_id: int, lp: Logprob | None = None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        tok = self.engine.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok else f"token_id:{token_id}"

    def _token_bytes(self, token_id: int) -> list[int] | None:
        """The token's own bytes: a token may hold part of a UTF-8 character, which its text cannot show."""
        tok = self.engine.tokenizer
        return list(tok.token_bytes(token_id)) if tok else None

    def _legacy_logprobs(self, records: list[dict[int, Logprob] | None], token_ids: list[int]) -> CompletionLogprobs:
        out, offset = CompletionLogprobs(), 0
        for tid, record in zip(token_ids, records):
            lp = record.get(tid) if record else None
            token = self._token_str(tid, lp)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob if lp else None)
            out.top_logprobs.append(None if record is None else
                                    {self._token_str(t, l): l.logprob
                                     for t, l in sorted(record.items(), key=lambda kv: kv[1].rank)})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    @staticmethod
    def _usage(ids: list[list[int]], completion_tokens: int) -> Usage:
        prompt = sum(len(t) for t in ids)
        return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)

    @staticmethod
    def _num_generated(finals: list[RequestOutput | None]) -> int:
        return sum(len(c.token_ids) for out in finals if out is not None for c in out.outputs)

    # ---- /v1/chat/completions ------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body.model)
        try:
            params = body.sampling_params()
            tok = self.engine.tokenizer
            if tok is None:
                raise ValueError("messages: this model has no tokenizer, so no chat template")
            prompt = tok.apply_chat_template([m.as_template_input() for m in body.messages],
                                             add_generation_prompt=body.add_generation_prompt)
            token_ids = self.engine.tokenize(tok.encode(prompt, add_special_tokens=False))
        except ValueError as e:
            msg = str(e)
            raise bad_request(ValueError(msg.replace("prompt:", "messages:", 1) if msg.startswith("prompt:")
                                         else msg)) from None
        except Exception as e:     # noqa: BLE001 -- a template that rejects the conversation
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from None
        ids = self._admit([prompt], params, [token_ids])
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self._start(request_id, [prompt], ids, params)
        if body.stream:
            return self._sse(self._chat_chunks(body, request_id, streams, ids))
        try:
            (out,) = await self._collect(streams, request)
        except ClientGone:
            return Response(status_code=499)
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                              logprobs=self._chat_logprobs(c.logprobs, c.token_ids, body.top_logprobs or 0)
                              if body.logprobs else None,
                              finish_reason=self._finish_reason(c.finish_reason), stop_reason=c.stop_reason)
                   for c in out.outputs]
        return ChatCompletionResponse(id=request_id, model=self.config.served_model_name, choices=choices,
                                      usage=self._usage(ids, self._num_generated([out]))).model_dump()

    async def _chat_chunks(self, body: ChatCompletionRequest, request_id: str, streams: list[RequestStream],
                           ids: list[list[int]]) -> AsyncIterator[dict]:
        created, model = int(time.time()), self.config.served_model_name

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict:
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices,
                                       usage=usage).model_dump()

        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
                     for j in range(body.n)])
        completion_tokens = 0
        merged = self._merge(streams, None)
        try:
            async for _, out in merged:
                choices = []
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    if not c.text and not c.finish_reason and not c.token_ids:
                        continue
                    logprobs = self._chat_logprobs(c.logprobs, c.token_ids, body.top_logprobs or 0) \
                        if body.logprobs else None
                    choices.append(ChatChunkChoice(index=c.index, delta=DeltaMessage(content=c.text or None),
                                                   logprobs=logprobs,
                                                   finish_reason=self._finish_reason(c.finish_reason)))
                if choices:
                    yield chunk(choices)
        finally:
            await merged.aclose()
        if body.include_usage:
            yield chunk([], self._usage(ids, completion_tokens))

    def _chat_logprobs(self, records: list[dict[int, Logprob]] | None, token_ids: list[int],
                       num_top: int) -> ChoiceLogprobs:
        content = []
        for tid, record in zip(token_ids, records or []):
            lp = record.get(tid)
            token = self._token_str(tid, lp)
            top = [TopLogprob(token=self._token_str(t, l), logprob=l.logprob, bytes=self._token_bytes(t))
                   for t, l in sorted(record.items(), key=lambda kv: kv[1].rank) if l.rank <= num_top][:num_top]
            content.append(TokenLogprob(token=token, logprob=lp.logprob if lp else float("-inf"),
                                        bytes=self._token_bytes(tid), top_logprobs=top))
        return ChoiceLogprobs(content=content)


def _add_delta(total: RequestOutput, delta: RequestOutput) -> RequestOutput:
    """`total` extended by a later DELTA output of the same request (best_of > n arrives whole, once)."""
    by_index = {c.index: c for c in total.outputs}
    outputs = []
    for c in delta.outputs:
        before = by_index.get(c.index)
        if before is None:
            outputs.append(c)
            continue
        logprobs = None if c.logprobs is None else (before.logprobs or []) + c.logprobs
        outputs.append(CompletionOutput(c.index, before.text + c.text, before.token_ids + c.token_ids,
                                        c.cumulative_logprob, logprobs, c.finish_reason, c.stop_reason))
    return RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids,
                         total.prompt_logprobs if total.prompt_logprobs is not None else delta.prompt_logprobs,
                         outputs, delta.finished, delta.metrics, delta.error)


# ---- `tokenmill serve` -----------------------------------------------------------------------------------
def default_model_name(model: str | None) -> str:
    from pathlib import Path

    from tokenmill.model_files import resolve_model
    path = Path(resolve_model(model))
    return path.stem if path.is_file() else path.name


def serve(engine_config, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_queued_requests: int | None = None,
          log_level: str = "info", timeout_graceful_shutdown: float | None = 60.0) -> None:
    """Load the engine, then serve until SIGINT / SIGTERM; in-flight requests finish first."""
    import uvicorn
    engine_thread = EngineThread(lambda: LLMEngine(engine_config))
    engine = engine_thread.built()
    name = served_model_name or default_model_name(engine_config.model)
    app = build_app(engine, ServerConfig(name, api_key, max_queued_requests), engine_thread)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=timeout_graceful_shutdown))
    # a dead engine (a tensor-parallel rank is gone) shuts the server down, which then exits non-zero
    app.state.async_engine.on_fatal = lambda error: setattr(server, "should_exit", True)
    logger.info("serving %r on http://%s:%d/v1", name, host, port)
    try:
        server.run()
    finally:
        engine_thread.hand_over(None)       # when the server never started the loop
        engine.shutdown()
    error = app.state.async_engine.error
    if error is not None:
        raise SystemExit(f"tokenmill: the engine failed, the server stopped: {error}")
