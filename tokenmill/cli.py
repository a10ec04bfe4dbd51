"""tokenmill generate | chat | bench | fetch  (and serve, see tokenmill.server)."""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="path to a .gguf file or HF directory, or a short name (default smollm2-135m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--quantization", default=None, choices=["dequantize", "int4", "int8", "gguf"],
                   help="default: run the checkpoint as stored (GGUF blocks packed, dense weights in --dtype); "
                        "dequantize = everything in --dtype (the transformers-exact path); int4 / int8 = "
                        "group-wise int4 weight-only / W8A8, made at load")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["float32", "bfloat16", "float16", "auto"],
                   help="the KV pages (default: float16 where packed weights run on the CPU kernels with float32 "
                        "activations, as llama.cpp stores its cache; else --dtype)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory-gb", type=float, default=2.0)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA: launch decode steps kernel by kernel instead of replaying CUDA graphs")
    p.add_argument("--attention-backend", default=None, choices=["cpu", "torch", "reference", "triton"],
                   help="default: triton on CUDA, cpu (ATen flash over pages) on CPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over N ranks: spawned here, or started by torchrun (docs/scaling.md)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\' or '
                        '\'{"method": "draft_model", "model": "smollm2-135m", "quantization": "int4"}\'')


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=None)


def engine_config(args: argparse.Namespace):
    from tokenmill.config import EngineConfig
    return EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization,
                        kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb,
                        enable_prefix_caching=not args.no_prefix_caching, max_model_len=args.max_model_len,
                        seed=args.seed, attention_backend=args.attention_backend, device=args.device,
                        speculative_config=args.speculative_config, tensor_parallel_size=args.tensor_parallel_size,
                        enforce_eager=args.enforce_eager)


def sampling_params(args: argparse.Namespace):
    from tokenmill.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.sample_seed, stop=args.stop)


def stream(engine, prompt, params, out=sys.stdout) -> str:
    """Run one request, writing its text to `out` as it is produced; returns the whole text."""
    rid = engine.add_request(None, prompt, params)
    shown = 0
    text = ""
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid:
                text = o.outputs[0].text
                out.write(text[shown:])
                out.flush()
                shown = len(text)
    out.write("\n")
    return text


def cmd_generate(args) -> None:
    if args.beam_width is not None:
        return beam_search(args)
    from tokenmill.engine import LLMEngine
    engine = LLMEngine(engine_config(args))
    params = sampling_params(args)
    for prompt in args.prompt:
        sys.stdout.write(prompt)
        stream(engine, prompt, params)
    if engine.spec is not None:
        print(engine.spec_stats.summary(), file=sys.stderr)


def beam_search(args) -> None:
    """Every prompt's beams, best first, with their scores (which beams win is known only at the end)."""
    from tokenmill.engine import LLM
    from tokenmill.sampling_params import BeamSearchParams
    if args.stop:
        sys.exit("error: --stop: stop strings are not supported with --beam-width")
    try:
        params = BeamSearchParams(args.beam_width, max_tokens=args.max_tokens, temperature=args.temperature,
                                  length_penalty=args.length_penalty,
                                  early_stopping={"true": True, "false": False}.get(args.early_stopping, "never"))
    except ValueError as e:
        sys.exit(f"error: {e}")
    llm = LLM.from_config(engine_config(args))
    try:
        outputs = llm.beam_search(args.prompt, params, use_tqdm=False)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for prompt, out in zip(args.prompt, outputs):
        for i, beam in enumerate(out.sequences):
            print(f"[beam {i}: score {beam.score:.4f}, logprob {beam.cum_logprob:.3f}, {beam.finish_reason}] "
                  f"{prompt}{beam.text}")


def cmd_chat(args) -> None:
    from tokenmill.engine import LLMEngine
    engine = LLMEngine(engine_config(args))
    if engine.tokenizer is None:
        sys.exit("chat: this model has no tokenizer")
    params = sampling_params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = stream(engine, engine.tokenizer.encode(text, add_special_tokens=False), params)
        messages.append({"role": "assistant", "content": reply})


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_offline_bench(engine, num_requests: int, input_len: int, output_len: int, seed: int = 0) -> dict[str, float]:
    """Random-token prompts, ignore_eos; returns throughput and latency figures."""
    from tokenmill.sampling_params import SamplingParams
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    start = time.time()
    ids = [engine.add_request(None, [rng.randrange(vocab) for _ in range(input_len)], params, arrival_time=start)
           for _ in range(num_requests)]
    finished = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
    elapsed = time.time() - start
    spec = engine.spec_stats
    ttft = [finished[r].metrics.first_token_time - finished[r].metrics.arrival_time for r in ids]
    tpot = [(finished[r].metrics.finished_time - finished[r].metrics.first_token_time) / max(1, output_len - 1)
            for r in ids]
    return {"requests": num_requests, "input_len": input_len, "output_len": output_len, "seconds": elapsed,
            "output_tok_s": num_requests * output_len / elapsed,
            "ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "tpot_p50_ms": 1000 * statistics.median(tpot), "tpot_p99_ms": 1000 * percentile(tpot, 99),
            "acceptance_rate": spec.acceptance_rate, "mean_acceptance_length": spec.mean_acceptance_length}


def cmd_bench(args) -> None:
    from tokenmill.engine import LLMEngine
    engine = LLMEngine(engine_config(args))
    r = run_offline_bench(engine, args.num_requests, args.input_len, args.output_len, args.seed)
    cols = ["requests", "input_len", "output_len", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if engine.spec is not None:
        print(engine.spec_stats.summary())


def cmd_perplexity(args) -> None:
    from pathlib import Path

    from tokenmill.engine import LLM
    from tokenmill.perplexity import perplexity, reference_text
    if args.model_path is not None:
        args.model = args.model_path
    text = Path(args.text).read_text() if args.text else reference_text("evaluation")
    llm = LLM.from_config(engine_config(args))
    ids = llm.get_tokenizer().encode(text)
    r = perplexity(llm, ids, args.ctx, args.max_windows)
    print(f"perplexity {r.ppl:.4f}  (mean NLL {r.nll:.4f} nats over {r.tokens} tokens, {r.windows} windows of "
          f"{args.ctx}, second halves scored; quantization={args.quantization or 'as stored'}, dtype={args.dtype}, kv_cache_dtype={args.kv_cache_dtype})")


def cmd_quantize(args) -> None:
    from pathlib import Path

    from tokenmill.model_files import resolve_model
    from tokenmill.quant.quantizer import quantize_awq, quantize_gptq, quantize_w8a8
    args.src = resolve_model(args.src)          # a path, or a short name such as smollm2-135m
    if args.method == "w8a8":
        print(f"wrote {quantize_w8a8(args.src, args.dst)}")
        return
    text = Path(args.calibration_text).read_text() if args.calibration_text else None
    if args.method == "awq":
        print(f"wrote {quantize_awq(args.src, args.dst, args.group_size, text, args.num_windows, args.window)}")
        return
    out = quantize_gptq(args.src, args.dst, bits=args.bits, group=args.group_size, sym=not args.asym,
                        act_order=args.act_order, calibration_text=text, num_windows=args.num_windows,
                        window=args.window)
    print(f"wrote {out}")


def cmd_serve(args) -> None:
    from tokenmill.server import serve
    serve(engine_config(args), host=args.host, port=args.port, api_key=args.api_key,
          served_model_name=args.served_model_name, max_queued_requests=args.max_queued_requests,
          log_level=args.log_level)


def cmd_fetch(args) -> None:
    from tokenmill.model_files import resolve_model
    print(resolve_model(args.model))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenmill", description="a small LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue prompts, streaming the text")
    _engine_args(g)
    _sampling_args(g)
    g.add_argument("--beam-width", type=int, default=None,
                   help="beam search with this many beams (printed best first when done) instead of sampling")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score = logprob / len ** this")
    g.add_argument("--early-stopping", default="false", choices=["true", "false", "never"],
                   help="beam search: transformers' early_stopping")
    g.add_argument("prompt", nargs="+")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's template")
    _engine_args(c)
    _sampling_args(c)
    c.add_argument("--system", default=None)
    c.set_defaults(func=cmd_chat)
    b = sub.add_parser("bench", help="offline throughput / latency benchmark")
    _engine_args(b)
    b.add_argument("--num-requests", type=int, default=64)
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    b.set_defaults(func=cmd_bench)
    pp = sub.add_parser("perplexity", help="sliding-window perplexity (llama-perplexity's method) of a text")
    pp.add_argument("model_path", nargs="?", default=None, help="same as --model")
    _engine_args(pp)
    pp.add_argument("--text", default=None, help="a UTF-8 text file (default: the evaluation half of "
                                                "Python's pydoc topics, disjoint from the calibration half)")
    pp.add_argument("--ctx", type=int, default=512, help="window length in tokens; the second half of each is scored")
    pp.add_argument("--max-windows", type=int, default=None)
    pp.set_defaults(func=cmd_perplexity)
    qz = sub.add_parser("quantize", help="quantize a dense Hugging Face directory (GPTQ or W8A8 checkpoint)")
    qz.add_argument("src", help="a dense Hugging Face directory, a GGUF file (llama, mistral, qwen2) or a short name")
    qz.add_argument("dst")
    qz.add_argument("--method", default="gptq", choices=["gptq", "awq", "w8a8"],
                    help="gptq or awq (4-bit, calibrated), or w8a8 (compressed-tensors int8, no calibration)")
    qz.add_argument("--bits", type=int, default=4, choices=[4, 8])
    qz.add_argument("--group-size", type=int, default=128, help="-1: one group per row")
    qz.add_argument("--asym", action="store_true", help="asymmetric grid (written as gptq_v2)")
    qz.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    qz.add_argument("--calibration-text", default=None,
                    help="a UTF-8 text file (default: the calibration half of Python's pydoc topics)")
    qz.add_argument("--num-windows", type=int, default=32)
    qz.add_argument("--window", type=int, default=512)
    qz.set_defaults(func=cmd_quantize)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file name)")
    s.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests allowed in flight beyond --max-num-seqs before new ones get a 503")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)
    f = sub.add_parser("fetch", help="fetch a model by short name and print its path")
    f.add_argument("--model", default=None)
    f.set_defaults(func=cmd_fetch)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
