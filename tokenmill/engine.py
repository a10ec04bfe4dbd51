"""LLMEngine (add_request / step / abort_request) and the offline LLM front end.

`step()` is schedule → run → postprocess; everything else here turns sequences into
RequestOutputs: detokenizing, stop strings, logprob records and best-of selection.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from tokenmill.attention import get_backend
from tokenmill.config import EngineConfig, cpu_has_amx_bf16
from tokenmill.core.block_manager import BlockManager
from tokenmill.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tokenmill.core.sequence import Sequence, SequenceStatus
from tokenmill.kv_cache import allocate_kv_cache, num_blocks_for_memory
from tokenmill.model.load import build_model, open_checkpoint
from tokenmill.model_files import resolve_model
from tokenmill.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput
from tokenmill.runner import Runner, StepResult
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("tokenmill")

Prompt = str | list[int]


@dataclass(eq=False)
class _Sample:
    """Engine-side state of one sequence: its text so far and its logprob records."""
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    hold: int = 0            # trailing characters held back: they may start a stop string


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    metrics: RequestMetrics
    prompt_logprobs: PromptLogprobs | None = None
    finished: bool = False
    seqs_by_id: dict[int, _Sample] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        device, dtype = config.torch_device, config.torch_dtype
        path = resolve_model(config.model)
        t0 = time.perf_counter()
        ckpt = open_checkpoint(path)
        self.model_config = cfg = ckpt.config
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if cfg.sliding_window and self.max_model_len > cfg.sliding_window:
            # attention here is always full; past the window the model would attend differently
            if config.max_model_len is not None:
                raise ValueError(f"max_model_len must be <= the model's sliding window ({cfg.sliding_window}): "
                                 f"sliding-window attention is not implemented, got {config.max_model_len}")
            logger.warning("max_model_len %d capped to the model's sliding window (%d): sliding-window "
                           "attention is not implemented", self.max_model_len, cfg.sliding_window)
            self.max_model_len = cfg.sliding_window
        self.model = build_model(ckpt, dtype, self.max_model_len, device, progress)
        self.tokenizer = self._load_tokenizer(ckpt)
        logger.info("loaded %s (%s, %d layers) in %.1f s", path.name, cfg.architecture, cfg.num_hidden_layers,
                    time.perf_counter() - t0)
        if dtype == torch.float32 and device.type == "cpu" and cpu_has_amx_bf16():
            logger.info("this CPU has AMX-BF16: dtype='bfloat16' (or 'auto') gives about 2x the batched "
                        "throughput and half the weight memory, at bfloat16 precision (docs/benchmarks.md)")
        num_blocks = config.num_kv_blocks or num_blocks_for_memory(cfg, config.block_size, dtype,
                                                                   config.kv_cache_memory_gb)
        logger.info("KV cache: %d pages of %d tokens; the longest context that fits is %d tokens",
                    num_blocks, config.block_size, num_blocks * config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else set()
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len), self.block_manager, eos)
        kv_caches = allocate_kv_cache(cfg, num_blocks, config.block_size, dtype, device)
        self.runner = Runner(self.model, kv_caches, get_backend(config.backend_name), config.block_size, eos,
                             config.seed, device)
        self.requests: dict[str, _Request] = {}
        self._next_id = 0

    @staticmethod
    def _load_tokenizer(ckpt) -> Tokenizer | None:
        if ckpt.gguf_metadata is None and not (ckpt.path / "tokenizer.json").is_file():
            logger.warning("%s has no tokenizer.json: prompts must be token ids and output text is empty", ckpt.path)
            return None
        if ckpt.gguf_metadata is not None:
            return Tokenizer.from_gguf(ckpt.gguf_metadata)
        return Tokenizer.from_dir(ckpt.path)

    # ---- requests ----------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        self._next_id += 1
        return str(self._next_id - 1)

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Prompt token ids, validated against the vocabulary and the context length."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt: token ids must be integers in [0, {self.model_config.vocab_size}), "
                                 f"got {bad[:5]}")
        if not ids:
            raise ValueError("prompt: must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within max_model_len "
                             f"({self.max_model_len}); shorten it to at most {self.max_model_len - 1} tokens")
        return ids

    def check_params(self, params: SamplingParams) -> None:
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer, and this model has none")

    def add_request(self, request_id: str | None, prompt: Prompt, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> str:
        params = params or SamplingParams()
        ids = prompt_token_ids if prompt_token_ids is not None else self.tokenize(prompt)
        self.check_params(params)
        request_id = request_id if request_id is not None else self.new_request_id()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        n = params.best_of or params.n
        leader = Sequence(request_id, list(ids), params)
        seqs = [leader] + [Sequence(request_id, list(ids), params, index=i) for i in range(1, n)]
        leader.pending_forks = seqs[1:]
        self.scheduler.add(leader)
        samples = [_Sample(s, IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                           if self.tokenizer else None, logprobs=[] if params.logprobs is not None else None)
                   for s in seqs]
        req = _Request(request_id, prompt if isinstance(prompt, str) else None, list(ids), params, samples,
                       RequestMetrics(arrival_time or time.time()),
                       prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        req.seqs_by_id = {s.seq.seq_id: s for s in samples}
        self.requests[request_id] = req
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in self.scheduler.abort(request_id):
            self.runner.release(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        result = self.runner.execute(out)
        self.scheduler.update(out, [s.token_id for s in result.sampled])
        return self._postprocess(out, result)

    def _postprocess(self, out: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, _Request] = {}
        for seq, _ in out.scheduled:
            req = self.requests.get(seq.request_id)
            if req is not None and req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.metrics.num_cached_tokens = seq.num_cached_tokens
        for seq_id, entries in result.prompt_logprobs.items():
            req = next(r for r in self.requests.values() if seq_id in r.seqs_by_id)
            for pos, entry in entries:      # after a preemption the prompt is recomputed: keep the first copy
                if pos + 1 == len(req.prompt_logprobs):
                    req.prompt_logprobs.append(self._prompt_logprob_record(req, pos + 1, entry))
        for (seq, _), tok in zip(out.samples, result.sampled):
            req = self.requests.get(seq.request_id)
            if req is None or seq.status is SequenceStatus.FINISHED_ABORTED:
                continue
            sample = req.seqs_by_id[seq.seq_id]
            seq.cumulative_logprob += tok.logprob
            if sample.logprobs is not None:
                sample.logprobs.append(self._logprob_record(tok, req.params.logprobs))
            if sample.detokenizer is not None:
                self._append_text(sample, sample.detokenizer.add(tok.token_id))
            req.metrics.first_token_time = req.metrics.first_token_time or now
            req.metrics.last_token_time = now
            touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if all(s.seq.is_finished for s in req.samples):
                req.finished = True
                req.metrics.finished_time = now
                for s in req.samples:
                    self.runner.release(s.seq)
                del self.requests[req.request_id]
            outputs.append(self._request_output(req))
        return outputs

    def _append_text(self, sample: _Sample, delta: str) -> None:
        seq, params = sample.seq, sample.seq.params
        sample.text += delta
        if not params.stop_strings:
            return
        window_start = max(0, len(sample.text) - len(delta) - max(map(len, params.stop_strings)) + 1)
        for stop in params.stop_strings:
            i = sample.text.find(stop, window_start)
            if i >= 0:
                sample.text = sample.text[:i + len(stop) if params.include_stop_str_in_output else i]
                sample.hold = 0
                seq.stop_reason = stop
                if seq.is_finished:
                    seq.status = SequenceStatus.FINISHED_STOPPED
                else:
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
                return
        sample.hold = 0 if seq.is_finished else max(
            (k for stop in params.stop_strings for k in range(1, len(stop)) if sample.text.endswith(stop[:k])),
            default=0)

    def _logprob_record(self, tok, num_top: int) -> dict[int, Logprob]:
        decode = self._decode_one
        record = {tok.token_id: Logprob(tok.logprob, tok.rank, decode(tok.token_id))}
        for rank, (tid, lp) in enumerate(tok.top_logprobs[:num_top], start=1):
            record.setdefault(tid, Logprob(lp, rank, decode(tid)))
        return record

    def _prompt_logprob_record(self, req: _Request, position: int, entry) -> dict[int, Logprob]:
        lp, rank, top = entry
        tid = req.prompt_token_ids[position]
        record = {tid: Logprob(lp, rank, self._decode_one(tid))}
        for r, (t, l) in enumerate(top[:req.params.prompt_logprobs], start=1):
            record.setdefault(t, Logprob(l, r, self._decode_one(t)))
        return record

    def _decode_one(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else None

    def _request_output(self, req: _Request) -> RequestOutput:
        samples = req.samples
        if req.finished and len(samples) > req.params.n:      # best_of: keep the n most likely
            samples = sorted(samples, key=lambda s: s.seq.cumulative_logprob, reverse=True)[:req.params.n]
        elif len(samples) > req.params.n:
            samples = samples[:req.params.n]
        outputs = []
        for i, s in enumerate(samples):
            seq = s.seq
            reason = seq.status.value if seq.is_finished else None
            text = s.text if s.hold == 0 else s.text[:-s.hold]
            outputs.append(CompletionOutput(
                index=i, text=text, token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob, logprobs=s.logprobs,
                finish_reason=reason, stop_reason=seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.prompt_logprobs, outputs,
                             req.finished, req.metrics)

    # ---- observability -----------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)


Message = dict[str, str]


class LLM:
    """The offline front end: `LLM(model).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str | None = None, *, dtype: str = "float32", block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, num_kv_blocks: int | None = None,
                 kv_cache_memory_gb: float = 2.0, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None, seed: int = 0, attention_backend: str | None = None,
                 device: str | None = None, progress: bool = True):
        config = EngineConfig(model=model, dtype=dtype, block_size=block_size, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
                              kv_cache_memory_gb=kv_cache_memory_gb, enable_prefix_caching=enable_prefix_caching,
                              max_model_len=max_model_len, seed=seed, attention_backend=attention_backend,
                              device=device)
        self.engine = LLMEngine(config, progress=progress)

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts; "
                                 f"pass one, or one per prompt")
        token_ids = [self.engine.tokenize(p) for p in prompts]     # reject bad input before queueing any
        for p in params:
            self.engine.check_params(p)
        ids = [self.engine.add_request(None, prompt, p, prompt_token_ids=t)
               for prompt, p, t in zip(prompts, params, token_ids)]
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat: this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in conversations]
        outputs = self.generate([tok.encode(t, add_special_tokens=False) for t in texts], sampling_params, use_tqdm)
        for out, text in zip(outputs, texts):
            out.prompt = text
        return outputs

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm
        done: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(request_ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:
            for rid in request_ids:
                self.engine.abort_request(rid)
            raise
        return [done[rid] for rid in request_ids]
