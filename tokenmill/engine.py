"""LLMEngine (add_request / step / abort_request) and the offline LLM front end.

`step()` is schedule → run → postprocess; everything else here turns sequences into
RequestOutputs: detokenizing, stop strings, logprob records and best-of selection.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from tokenmill.attention import get_backend
from tokenmill.config import EngineConfig, SpeculativeConfig, cpu_has_amx_bf16
from tokenmill.core.beam import BeamGroup
from tokenmill.core.block_manager import BlockManager
from tokenmill.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tokenmill.core.sequence import Sequence, SequenceStatus
from tokenmill.cuda_graphs import DecodeGraphs
from tokenmill.kv_cache import KVLayout, allocate_kv_cache, bytes_per_block, num_blocks_for_memory
from tokenmill.model.load import (Checkpoint, activation_dtype, build_model, cache_dtype, describe_weights, open_checkpoint,
                                  weight_bytes)
from tokenmill.model_files import resolve_model
from tokenmill.outputs import (BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, PromptLogprobs,
                               RequestMetrics, RequestOutput, SpecDecodeStats)
from tokenmill.parallel.comm import SINGLE, check_tensor_parallel
from tokenmill.parallel.ranks import RankInit, Ranks, TensorParallelError, launcher_env, run_launched_rank
from tokenmill.runner import Runner, StepResult
from tokenmill.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from tokenmill.spec.draft import DraftModelProposer
from tokenmill.spec.ngram import NgramProposer
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
    stop_floor: int = 0      # stop strings may only start here: the text before came within min_tokens
    sent_text: int = 0       # what DELTA outputs have handed out so far: characters,
    sent_tokens: int = 0     # and tokens (and logprob records)
    num_tokens: int = 0      # output tokens taken in so far


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
    error: str | None = None
    sent_prompt_logprobs: bool = False
    seqs_by_id: dict[int, _Sample] = field(default_factory=dict)
    beam: BeamGroup | None = None

    @property
    def done(self) -> bool:
        return self.beam.done if self.beam is not None else all(s.seq.is_finished for s in self.samples)

    @property
    def emits_every_step(self) -> bool:
        """FINAL_ONLY emits once; so does DELTA with best_of > n (which samples stay is known at the end)."""
        if self.beam is not None:
            return False
        kind = self.params.output_kind
        return kind is RequestOutputKind.CUMULATIVE or (kind is RequestOutputKind.DELTA
                                                        and len(self.samples) == self.params.n)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        tp = config.tensor_parallel_size
        launched = launcher_env()
        if launched is not None and launched[1] != tp:
            raise ValueError(f"tensor_parallel_size ({tp}) must equal the launcher's WORLD_SIZE ({launched[1]}): "
                             f"this process was started as rank {launched[0]} of {launched[1]}")
        if launched is not None and launched[0] > 0:
            run_launched_rank(config)       # serves rank 0's steps, then exits the process
        device = config.torch_device
        path = resolve_model(config.model)
        t0 = time.perf_counter()
        ckpt = open_checkpoint(path)
        method = ckpt.method(config.quantization)
        dtype = activation_dtype(config, method)
        kv_dtype = cache_dtype(config, method, dtype)
        self.model_config = cfg = ckpt.config
        check_tensor_parallel(cfg, tp)
        self.spec = spec = config.speculative_config
        drafting = spec is not None and spec.method == "draft_model"
        if drafting and tp > 1:
            raise ValueError("speculative_config: a draft model does not run under tensor parallelism yet; "
                             "use method 'ngram' or tensor_parallel_size 1")
        draft = self._open_draft(spec) if drafting else None        # (checkpoint, activation dtype, KV dtype)
        # a window that spans every context this engine can run is full attention (Mistral 7B v0.1 at 4k)
        reach = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        layout = KVLayout.of([w if w is not None and w < reach else None for w in cfg.layer_windows])
        draft_bytes = bytes_per_block(draft[0].config, config.block_size, draft[2],
                                      draft[0].config.num_hidden_layers) if draft else 0
        num_blocks = config.num_kv_blocks or num_blocks_for_memory(cfg, config.block_size, kv_dtype,
                                                                   config.kv_cache_memory_gb, layout.num_slots,
                                                                   draft_bytes, tp)
        if drafting and layout.group_windows[0] is not None:
            raise ValueError("speculative_config: a draft model reads the target's full-attention pages, and every "
                             f"layer of {path.name} slides (window {cfg.sliding_window}); use method 'ngram'")
        prefix_caching = config.enable_prefix_caching and layout.group_windows == (None,)
        if config.enable_prefix_caching and not prefix_caching:
            logger.info("prefix caching is off: the sliding-window layers (window %d) release their pages",
                        cfg.sliding_window)
        self.block_manager = BlockManager(num_blocks, config.block_size, prefix_caching,
                                          windows=layout.group_windows)
        lookahead = spec.num_speculative_tokens if drafting else 0
        self.max_model_len = self._context_length(
            cfg, self.block_manager.max_tokens(config.max_num_batched_tokens + lookahead, cfg.max_position_embeddings))
        self.ranks = self._start_ranks(layout, num_blocks, dtype, kv_dtype) if tp > 1 else None
        try:          # from here on, a failure must not leave the other ranks running
            self.model = build_model(ckpt, dtype, self.max_model_len, device, method,
                                     progress, self.ranks.group if self.ranks else SINGLE)
            if self.ranks is not None:
                self.ranks.wait_ready()
            self.tokenizer = self._load_tokenizer(ckpt)
            logger.info("loaded %s (%s, %d layers) in %.1f s: %s; weights %.1f MB%s", path.name, cfg.architecture,
                        cfg.num_hidden_layers, time.perf_counter() - t0, describe_weights(self.model),
                        weight_bytes(self.model) / 1e6, f" on each of {tp} ranks (rank 0's shard)" if tp > 1 else "")
            if dtype == torch.float32 and device.type == "cpu" and cpu_has_amx_bf16() and not method.packed:
                logger.info("this CPU has AMX-BF16: dtype='bfloat16' (or 'auto') gives about 2x the batched "
                            "throughput and half the weight memory, at bfloat16 precision (docs/benchmarks.md)")
            logger.info("KV cache: %d pages of %d tokens, %s, %d KV group(s) %s; max_model_len %d", num_blocks,
                        config.block_size, str(kv_dtype).removeprefix("torch."), len(layout.group_windows),
                        "/".join("full" if w is None else f"window {w}" for w in layout.group_windows),
                        self.max_model_len)
            eos = self.tokenizer.eos_token_ids if self.tokenizer else set()
            self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                       self.max_model_len, lookahead),
                                       self.block_manager, eos)
            kv_caches = allocate_kv_cache(cfg, num_blocks, config.block_size, kv_dtype, device, layout.num_slots, tp)
            self.runner = Runner(self.model, kv_caches, get_backend(config.backend_name), config.block_size, eos,
                                 config.seed, device, cfg.vocab_size, layout)
            self.runner.ranks = self.ranks
            # the Triton backend only: its kernels read the recorded tensors alone (the others read the step's
            # Python lists too, which a graph would freeze)
            if (device.type == "cuda" and config.backend_name == "triton" and not config.enforce_eager
                    and self.ranks is None):
                t1 = time.perf_counter()
                graphs = self.runner.graphs = DecodeGraphs(self.runner, config.max_num_seqs, self.max_model_len)
                graphs.record_all()
                if not graphs.failed:
                    logger.info("decode steps of %s rows recorded as CUDA graphs in %.1f s (enforce_eager=True: "
                                "launched eagerly)", "/".join(map(str, graphs.recorded)), time.perf_counter() - t1)
            self.ngram = (NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
                          if spec and not drafting else None)
            if draft is not None:
                self.runner.drafter = self._load_draft(spec, *draft, num_blocks, progress)
            self.spec_stats = SpecDecodeStats()
            self.requests: dict[str, _Request] = {}
            self._failed: list[_Request] = []
            self._next_id = 0
            self.last_step_tokens = 0        # tokens the last step computed: 0 means it had nothing to do
        except BaseException:
            if self.ranks is not None:
                self.ranks.close(kill=True)
            raise

    def _start_ranks(self, layout: KVLayout, num_blocks: int, dtype: torch.dtype, kv_dtype: torch.dtype) -> Ranks:
        """Start ranks 1..N-1 (or meet the ones a launcher started) and join the group; each rank uses
        threads / N CPU threads, and rank 0's activation and KV dtypes (what "auto" resolved to here)."""
        tp = self.config.tensor_parallel_size
        before = torch.get_num_threads()
        threads = max(1, before // tp)
        ranks = Ranks(self.config, RankInit(self.config, layout, num_blocks, self.max_model_len, threads, dtype, kv_dtype))
        ranks.threads_before = before               # given back when the ranks stop
        torch.set_num_threads(threads)
        logger.info("tensor parallelism: %d ranks (%s), %d CPU thread(s) each", tp,
                    "started by the launcher" if ranks.launched else "spawned", threads)
        return ranks

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (also done at exit); the engine cannot step afterwards."""
        if self.ranks is not None:
            self.ranks.close()

    def _context_length(self, cfg, cache_tokens: int) -> int:
        """max_model_len: the configured one, checked against the model's positions and the KV cache
        (one sequence must always fit, or it could never finish); by default the largest that does."""
        asked = self.config.max_model_len
        if asked is not None and asked > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len ({asked}) exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings}); use at most {cfg.max_position_embeddings}")
        if asked is not None and asked > cache_tokens:
            raise ValueError(f"max_model_len ({asked}) exceeds the {cache_tokens} tokens the KV cache holds; "
                             f"raise num_kv_blocks / kv_cache_memory_gb or lower max_model_len")
        length = asked or cfg.max_position_embeddings
        if length > cache_tokens:
            logger.warning("max_model_len %d capped to the %d tokens the KV cache holds (raise num_kv_blocks / "
                           "kv_cache_memory_gb for longer contexts)", length, cache_tokens)
            length = cache_tokens
        return length

    def _open_draft(self, spec: SpeculativeConfig) -> tuple[Checkpoint, torch.dtype, torch.dtype]:
        """The draft's checkpoint, activation and KV dtypes; refused unless its vocabulary is the target's."""
        ckpt = open_checkpoint(resolve_model(spec.model))
        vocab = self.model_config.vocab_size
        if ckpt.config.vocab_size != vocab:
            raise ValueError(f"speculative_config.model: the draft's vocabulary ({ckpt.config.vocab_size} tokens, "
                             f"{ckpt.path.name}) differs from the target's ({vocab}); a draft must share the tokenizer")
        config, method = dataclasses.replace(self.config, dtype=spec.dtype or self.config.dtype), ckpt.method(spec.quantization)
        dtype = activation_dtype(config, method)
        return ckpt, dtype, cache_dtype(config, method, dtype)

    def _load_draft(self, spec: SpeculativeConfig, ckpt: Checkpoint, dtype: torch.dtype, kv_dtype: torch.dtype,
                    num_blocks: int, progress: bool) -> DraftModelProposer:
        """The draft model with its own KV cache over the target's pages; refused unless its tokenizer
        is the target's and its positions reach max_model_len."""
        config, dcfg = self.config, ckpt.config
        tokenizer = self._load_tokenizer(ckpt)
        if (tokenizer is None) != (self.tokenizer is None) or (
                tokenizer is not None and tokenizer.vocab() != self.tokenizer.vocab()):
            raise ValueError(f"speculative_config.model: the draft's tokenizer ({ckpt.path.name}) differs from the "
                             f"target's; a draft must map the same text to the same token ids")
        if dcfg.max_position_embeddings < self.max_model_len:
            raise ValueError(f"speculative_config.model: the draft has {dcfg.max_position_embeddings} positions, "
                             f"fewer than max_model_len ({self.max_model_len}); lower max_model_len")
        device = config.torch_device
        t0 = time.perf_counter()
        model = build_model(ckpt, dtype, self.max_model_len, device, ckpt.method(spec.quantization), progress)
        kv_caches = allocate_kv_cache(dcfg, num_blocks, config.block_size, kv_dtype, device, dcfg.num_hidden_layers)
        logger.info("draft %s (%d layers) in %.1f s: %s; weights %.1f MB, KV %.1f MB; %d tokens proposed per step",
                    ckpt.path.name, dcfg.num_hidden_layers, time.perf_counter() - t0, describe_weights(model),
                    weight_bytes(model) / 1e6, sum(k.numel() * k.element_size() * 2 for k, _ in kv_caches) / 1e6,
                    spec.num_speculative_tokens)
        return DraftModelProposer(model, kv_caches, get_backend(config.backend_name), config.block_size, device)

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
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt: not valid Unicode text ({e.reason} at character {e.start})") from None
            return self.check_prompt_ids(self.tokenizer.encode(prompt))
        return self.check_prompt_ids(prompt)

    def check_prompt_ids(self, ids: Seq[int]) -> list[int]:
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"prompt: must be text or a list of token ids, got {type(ids).__name__}")
        ids = list(ids)
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab}), got {bad[:5]}")
        if not ids:
            raise ValueError("prompt: must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within max_model_len "
                             f"({self.max_model_len}); shorten it to at most {self.max_model_len - 1} tokens")
        return ids

    def check_params(self, params: SamplingParams | BeamSearchParams) -> None:
        """The limits that depend on this engine: the vocabulary, max_num_seqs, the tokenizer."""
        if isinstance(params, BeamSearchParams):
            token_ids = [("stop_token_ids", params.stop_token_ids)]
            name, group, what = "beam_width", params.beam_width, "beams"
        elif isinstance(params, SamplingParams):
            if params.stop_strings and self.tokenizer is None:
                raise ValueError("stop: stop strings need a tokenizer, and this model has none")
            token_ids = [("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias or ()))]
            group = params.best_of or params.n
            name, what = "best_of" if params.best_of else "n", f"{group} samples"
        else:
            raise ValueError(f"sampling_params: must be a SamplingParams, got {type(params).__name__}")
        vocab = self.model_config.vocab_size
        for field_name, ids in token_ids:
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{field_name}: token ids must be in [0, {vocab}), got {bad[:5]}")
        if group > self.config.max_num_seqs:
            raise ValueError(f"{name} must be <= max_num_seqs ({self.config.max_num_seqs}): the "
                             f"{what} of one request run side by side, got {group}")

    def add_request(self, request_id: str | None, prompt: Prompt, params: SamplingParams | BeamSearchParams | None = None,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> str:
        """Queue a request; everything is validated here (ValueError naming the field), so nothing
        invalid reaches a step."""
        params = params or SamplingParams()
        self.check_params(params)
        ids = self.check_prompt_ids(prompt_token_ids) if prompt_token_ids is not None else self.tokenize(prompt)
        request_id = request_id if request_id is not None else self.new_request_id()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(params, BeamSearchParams):
            return self._add_beam_request(request_id, prompt, ids, params, arrival_time)
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

    def _add_beam_request(self, request_id: str, prompt: Prompt, ids: list[int], params: BeamSearchParams,
                          arrival_time: float | None) -> str:
        eos = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else ())
        limit = len(ids) + params.max_tokens if params.max_tokens is not None else self.max_model_len
        group = BeamGroup(params, len(ids), min(limit, self.max_model_len),
                          frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos), eos)
        group.beams = [Sequence(request_id, list(ids), params.as_sampling_params(), beam=group)]
        self.scheduler.add(group.beams[0])
        self.requests[request_id] = _Request(request_id, prompt if isinstance(prompt, str) else None, list(ids),
                                             group.beams[0].params, [], RequestMetrics(arrival_time or time.time()),
                                             beam=group)
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req.beam is not None:
            req.beam.done = True
        for seq in self.scheduler.abort(request_id):
            self.runner.release(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._failed)

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_step_tokens = out.num_batched_tokens
        if out.is_empty:
            return self._flush_failed()
        snapshot = self.runner.snapshot(out)
        try:
            result = self.runner.execute(out) if out.scheduled else StepResult([])
        except TensorParallelError:
            raise                # a rank failed: the group is out of step, nothing can be retried
        except Exception:      # noqa: BLE001 -- find the request(s) that broke it; the others go on
            logger.exception("a step of %d sequences failed; retrying its requests one by one", len(out.scheduled))
            self.runner.restore(snapshot)
            out, result = self._execute_alone(out)
        num_drafts = [len(seq.spec_token_ids) for seq, _ in out.samples]
        finished = self.scheduler.update(out, [[t.token_id for t in toks] for toks in result.sampled],
                                         result.beam_candidates)
        outputs = self._postprocess(out, result, finished, num_drafts)
        self._propose()
        return outputs + self._flush_failed()

    # ---- speculative decoding ----------------------------------------------------------------------
    def _propose(self) -> None:
        """Drafts for the running sequences that decode next, unless more than disable_by_batch_size run."""
        spec = self.spec
        running = self.scheduler.running
        if spec is None or (spec.disable_by_batch_size is not None and len(running) > spec.disable_by_batch_size):
            return
        seqs, limits = [], []
        for seq in running:
            if (seq.beam is None and not seq.spec_token_ids and not seq.pending_forks
                    and seq.num_computed_tokens == seq.num_tokens - 1 and (limit := self._draft_limit(seq)) > 0):
                seqs.append(seq)
                limits.append(limit)
        if not seqs:
            return
        if self.ngram is not None:
            drafts = [self.ngram.propose(seq.token_ids, limit) for seq, limit in zip(seqs, limits)]
        else:
            try:
                drafts = self.runner.propose(seqs, limits)
            except Exception:     # noqa: BLE001 -- drafts are an optimisation: decode without them this step
                logger.exception("the draft model failed; this step runs without drafts")
                return
        for seq, d in zip(seqs, drafts):
            seq.spec_token_ids = d

    def _draft_limit(self, seq: Sequence) -> int:
        """Drafts that fit: the step emits one token past them, within max_tokens and max_model_len;
        a draft model writes them into the sequence's own pages only."""
        limit = min(self.spec.num_speculative_tokens, self.max_model_len - seq.num_tokens - 1)
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
        if self.runner.drafter is not None:
            limit = min(limit, self.block_manager.writable_slots(seq, seq.num_tokens - 1))
        return limit

    def _execute_alone(self, out: SchedulerOutput) -> tuple[SchedulerOutput, StepResult]:
        """Run each request of a failed step by itself; fail those that fail alone. Returns the step
        as it went for the rest."""
        groups: dict[str, SchedulerOutput] = {}
        rows: dict[str, dict[int, int]] = {}
        for i, (seq, n) in enumerate(out.scheduled):
            group = groups.setdefault(seq.request_id, SchedulerOutput())
            rows.setdefault(seq.request_id, {})[i] = len(group.scheduled)
            group.scheduled.append((seq, n))
        for seq, row in out.samples:
            groups[seq.request_id].samples.append((seq, rows[seq.request_id][row]))
        for beam_group, group_rows in out.beam_groups:
            rid = out.scheduled[group_rows[0]][0].request_id
            groups[rid].beam_groups.append((beam_group, [rows[rid][r] for r in group_rows]))
        kept, result = SchedulerOutput(block_copies=out.block_copies), StepResult([])
        for request_id, group in groups.items():
            group.block_copies = out.block_copies     # copying again is harmless: the sources are unchanged
            try:
                part = self.runner.execute(group)
            except TensorParallelError:
                raise
            except Exception as e:     # noqa: BLE001
                logger.exception("request %s fails alone: failing it", request_id)
                self._fail(request_id, e)
                continue
            base = len(kept.scheduled)
            kept.scheduled += group.scheduled
            kept.samples += [(seq, base + row) for seq, row in group.samples]
            kept.beam_groups += [(g, [base + r for r in rs]) for g, rs in group.beam_groups]
            result.sampled += part.sampled
            result.beam_candidates += part.beam_candidates
            result.prompt_logprobs.update(part.prompt_logprobs)
        kept.finished = [s for s in out.finished if s.request_id in self.requests]
        return kept, result

    def _fail(self, request_id: str, error: BaseException) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        req.error = f"{type(error).__name__}: {error}"
        self.abort_request(request_id)
        req.finished = True
        req.metrics.finished_time = time.time()
        self._failed.append(req)

    def _flush_failed(self) -> list[RequestOutput]:
        failed, self._failed = self._failed, []
        return [self._request_output(req) for req in failed]

    def _postprocess(self, out: SchedulerOutput, result: StepResult, finished: list[Sequence],
                     num_drafts: list[int]) -> list[RequestOutput]:
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
        for (seq, _), toks, drafts in zip(out.samples, result.sampled, num_drafts):
            req = self.requests.get(seq.request_id)
            if req is None or seq.status is SequenceStatus.FINISHED_ABORTED:
                continue
            if drafts:
                self.spec_stats.observe(drafts, len(toks) - 1)
                req.metrics.spec_decode = req.metrics.spec_decode or SpecDecodeStats()
                req.metrics.spec_decode.observe(drafts, len(toks) - 1)
            try:
                self._add_tokens(req, req.seqs_by_id[seq.seq_id], toks)
            except Exception as e:      # noqa: BLE001 -- e.g. a detokenizer error: this request alone fails
                logger.exception("request %s failed after sampling: failing it", req.request_id)
                self._fail(req.request_id, e)
                continue
            req.metrics.first_token_time = req.metrics.first_token_time or now
            req.metrics.last_token_time = now
            touched[req.request_id] = req
        for _, rows in out.beam_groups:
            if (req := self.requests.get(out.scheduled[rows[0]][0].request_id)) is not None:
                req.metrics.first_token_time = req.metrics.first_token_time or now
                req.metrics.last_token_time = now
        for seq in finished:
            if seq.beam is not None:      # a beam dropped or ended: the request goes on with the others
                self.runner.release(seq)
            if (req := self.requests.get(seq.request_id)) is not None:
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if req.done:
                req.finished = True
                req.metrics.finished_time = now
                for s in req.samples:
                    self.runner.release(s.seq)
                del self.requests[req.request_id]
            if req.finished or req.emits_every_step:
                outputs.append(self._request_output(req))
        return outputs

    def _add_tokens(self, req: _Request, sample: _Sample, toks: list) -> None:
        """Take in the tokens the scheduler appended (a stop may have cut the step's list short); a stop
        string inside them ends the sequence there, and what followed is dropped."""
        seq = sample.seq
        appended = seq.num_output_tokens - sample.num_tokens
        for i, tok in enumerate(toks[:appended]):
            sample.num_tokens += 1
            seq.cumulative_logprob += tok.logprob
            if sample.logprobs is not None:
                sample.logprobs.append(self._logprob_record(tok, req.params.logprobs))
            if sample.detokenizer is not None:
                delta = sample.detokenizer.add(tok.token_id)
                # an EOS or stop token ends the text without its own (vLLM's rule), unless asked for
                if (i == appended - 1 and seq.status is SequenceStatus.FINISHED_STOPPED
                        and not req.params.include_stop_str_in_output):
                    delta = ""
                self._append_text(sample, delta)
                if isinstance(seq.stop_reason, str):
                    del seq.token_ids[seq.num_prompt_tokens + sample.num_tokens:]
                    break

    def _append_text(self, sample: _Sample, delta: str) -> None:
        seq, params = sample.seq, sample.seq.params
        sample.text += delta
        if not params.stop_strings:
            return
        if seq.num_output_tokens < params.min_tokens:       # no stop string may end the text yet
            sample.stop_floor, sample.hold = len(sample.text), 0
            return
        window_start = max(sample.stop_floor,
                           len(sample.text) - len(delta) - max(map(len, params.stop_strings)) + 1)
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
        if req.beam is not None:
            return self._beam_output(req)
        samples, n = req.samples, req.params.n
        if req.finished and len(samples) > n:      # best_of: keep the n most likely
            samples = sorted(samples, key=lambda s: s.seq.cumulative_logprob, reverse=True)[:n]
        elif len(samples) > n:
            samples = samples[:n]
        delta = req.params.output_kind is RequestOutputKind.DELTA
        outputs = []
        for i, s in enumerate(samples):
            seq = s.seq
            visible = len(s.text) - s.hold
            first_token = seq.num_prompt_tokens + (s.sent_tokens if delta else 0)
            outputs.append(CompletionOutput(
                index=i, text=s.text[s.sent_text if delta else 0:visible], token_ids=seq.token_ids[first_token:],
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=s.logprobs[s.sent_tokens:] if delta and s.logprobs is not None else s.logprobs,
                finish_reason=seq.status.value if seq.is_finished else None, stop_reason=seq.stop_reason))
            if delta:
                s.sent_text, s.sent_tokens = visible, seq.num_output_tokens
        prompt_logprobs = req.prompt_logprobs
        if delta:          # the prompt is done before anything is emitted: its logprobs go out once
            prompt_logprobs = None if req.sent_prompt_logprobs else req.prompt_logprobs
            req.sent_prompt_logprobs = True
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, prompt_logprobs, outputs,
                             req.finished, req.metrics, error=req.error)

    def _beam_output(self, req: _Request) -> RequestOutput:
        """The finished hypotheses, best first (nothing while the search runs: beams are not final)."""
        outputs = []
        for i, h in enumerate(req.beam.finished if req.finished else []):
            text_ids = h.token_ids[:-1] if h.finish_reason == "stop" else h.token_ids
            outputs.append(CompletionOutput(
                index=i, text=self.tokenizer.decode(text_ids) if self.tokenizer else "", token_ids=list(h.token_ids),
                cumulative_logprob=h.cumulative_logprob,
                logprobs=[{t: Logprob(lp, rank, self._decode_one(t))} for t, (lp, rank) in zip(h.token_ids, h.logprobs)],
                finish_reason=h.finish_reason, stop_reason=h.stop_reason, score=h.score))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, None, outputs, req.finished,
                             req.metrics, error=req.error)

    # ---- observability -----------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)


Message = dict[str, str]


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages: entry {i} must be a dict with string 'role' and 'content', got {m!r}"[:200])
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"messages: entry {i} is not valid Unicode text ({e.reason})") from None


class LLM:
    """The offline front end: `LLM(model).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str | None = None, *, dtype: str = "float32", quantization: str | None = None,
                 kv_cache_dtype: str = "auto", block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, num_kv_blocks: int | None = None,
                 kv_cache_memory_gb: float = 2.0, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None, seed: int = 0, attention_backend: str | None = None,
                 device: str | None = None, speculative_config: SpeculativeConfig | dict | str | None = None,
                 tensor_parallel_size: int = 1, enforce_eager: bool = False, progress: bool = True):
        config = EngineConfig(model=model, dtype=dtype, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                              block_size=block_size,
                              max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks,
                              kv_cache_memory_gb=kv_cache_memory_gb, enable_prefix_caching=enable_prefix_caching,
                              max_model_len=max_model_len, seed=seed, attention_backend=attention_backend,
                              device=device, speculative_config=speculative_config,
                              tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager)
        self.engine = LLMEngine(config, progress=progress)

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config, progress=progress)
        return llm

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks now rather than at exit."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        prompts = self._prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts; "
                                 f"pass one, or one per prompt")
        token_ids = [self.engine.tokenize(p) for p in prompts]     # reject bad input before queueing any
        for p in params:
            if isinstance(p, BeamSearchParams):
                raise ValueError("sampling_params: BeamSearchParams go to LLM.beam_search, not generate")
            self.engine.check_params(p)
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        ids = [self.engine.add_request(None, prompt, p, prompt_token_ids=t)
               for prompt, p, t in zip(prompts, params, token_ids)]
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: Prompt | Seq[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = True) -> list[BeamSearchOutput]:
        """Beam search for every prompt, batched with each other (transformers' scoring, see
        BeamSearchParams); per prompt the beams best first."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params: must be a BeamSearchParams, got {type(params).__name__}")
        prompts = self._prompt_list(prompts)
        token_ids = [self.engine.tokenize(p) for p in prompts]
        self.engine.check_params(params)
        ids = [self.engine.add_request(None, prompt, params, prompt_token_ids=t) for prompt, t in zip(prompts, token_ids)]
        return [BeamSearchOutput.from_request_output(out) for out in self._run(ids, use_tqdm)]

    @staticmethod
    def _prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat: this model has no tokenizer, so no chat template")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: must be a non-empty list of messages, or of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        for conversation in conversations:
            _check_messages(conversation)
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
        if self.engine.spec is not None and use_tqdm:
            logger.info("%s (since start)", self.engine.spec_stats.summary())
        return [done[rid] for rid in request_ids]
