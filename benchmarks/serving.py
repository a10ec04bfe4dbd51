"""Serving load generator for any OpenAI-compatible /v1/completions endpoint (tokenmill, llama.cpp, ...).

    # one server, a sweep of Poisson request rates and fixed concurrencies; results appended to a JSON file
    python benchmarks/serving.py run --base-url http://127.0.0.1:8000 --label tokenmill \\
        --request-rates 0.5,1,2,inf --concurrency 1,8 --num-prompts 16 --input-len 128 --output-len 32 \\
        --out results/serving.json
    # table (markdown) and latency-versus-throughput plot of every label in the file
    python benchmarks/serving.py report results/serving.json --png docs/serving.png

Prompts are random token ids decoded to text with the model's own tokenizer (so every server gets the
same text), or chunks of a local text file (--prompt-file). Every request streams, asks for exactly
--output-len tokens (ignore_eos, plus a logit bias against EOS for servers without ignore_eos) at
temperature 0, and is timed on the client: TTFT (send to first text), TPOT ((end - first) / (tokens - 1)),
ITL (gaps between streamed chunks) and output throughput (generated tokens / wall time).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class RunResult:
    label: str
    mode: str                # "rate" (Poisson arrivals, req/s) or "concurrency" (closed loop)
    value: float
    num_prompts: int
    completed: int
    seconds: float
    output_tok_s: float
    request_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_ms: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ---- prompts ------------------------------------------------------------------------------------------------
def load_tokenizer(model: str | None):
    from tokenmill.model.load import open_checkpoint
    from tokenmill.model_files import resolve_model
    from tokenmill.tokenizer import Tokenizer
    path = resolve_model(model)
    ckpt = open_checkpoint(path)
    return Tokenizer.from_gguf(ckpt.gguf_metadata) if ckpt.gguf_metadata is not None else Tokenizer.from_dir(path)


def make_prompts(tokenizer, num: int, input_len: int, prompt_file: str | None, seed: int) -> list[str]:
    rng = random.Random(seed)
    if prompt_file:
        ids = tokenizer.encode(Path(prompt_file).read_text(), add_special_tokens=False)
        if len(ids) < input_len:
            raise SystemExit(f"--prompt-file has {len(ids)} tokens, fewer than --input-len {input_len}")
        starts = [rng.randrange(len(ids) - input_len + 1) for _ in range(num)]
        return [tokenizer.decode(ids[s:s + input_len]) for s in starts]
    special = set(tokenizer.eos_token_ids) | {tokenizer.bos_token_id}
    low, high = 256, tokenizer.vocab_size      # skip control and single-byte tokens: text round-trips better
    prompts = []
    for _ in range(num):
        ids = [t for t in (rng.randrange(low, high) for _ in range(input_len)) if t not in special]
        prompts.append(tokenizer.decode(ids))
    return prompts


# ---- one request -------------------------------------------------------------------------------------------
async def send(client: httpx.AsyncClient, url: str, model: str, prompt: str, output_len: int,
               eos_ids: list[int], headers: dict[str, str]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "logit_bias": {str(t): -100.0 for t in eos_ids},
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    itl, text, usage_tokens = [], "", None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                return RequestResult(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                delta = "".join(c.get("text") or "" for c in chunk.get("choices", []))
                if delta:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        itl.append(now - last)
                    last = now
                    text += delta
    except httpx.HTTPError as e:
        return RequestResult(False, error=repr(e))
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, error="no text streamed")
    return RequestResult(True, first - start, end - start, usage_tokens or output_len, itl)


# ---- a load pattern ----------------------------------------------------------------------------------------
async def run_load(args, prompts: list[str], eos_ids: list[int], mode: str, value: float) -> RunResult:
    url = args.base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        rng = random.Random(args.seed)
        start = time.perf_counter()
        if mode == "rate":
            tasks = []
            for prompt in prompts:
                tasks.append(asyncio.create_task(send(client, url, args.model, prompt, args.output_len, eos_ids,
                                                      headers)))
                if math.isfinite(value):
                    await asyncio.sleep(rng.expovariate(value))
            results = await asyncio.gather(*tasks)
        else:
            queue = list(prompts)
            results = []

            async def worker():
                while queue:
                    results.append(await send(client, url, args.model, queue.pop(), args.output_len, eos_ids,
                                              headers))
            await asyncio.gather(*(worker() for _ in range(int(value))))
        seconds = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    for r in results:
        if not r.ok:
            print(f"  failed: {r.error}")
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    ms = 1000.0
    return RunResult(args.label, mode, value, len(prompts), len(ok), seconds,
                     sum(r.output_tokens for r in ok) / seconds, len(ok) / seconds,
                     ms * percentile(ttft, 50), ms * percentile(ttft, 99), ms * percentile(tpot, 50),
                     ms * percentile(tpot, 99), ms * percentile(itl, 50), ms * percentile(itl, 99),
                     ms * percentile([r.e2e for r in ok], 50))


COLUMNS = ["label", "mode", "value", "completed", "output_tok_s", "request_s", "ttft_p50_ms", "ttft_p99_ms",
           "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms"]


def table(rows: list[dict]) -> str:
    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def cmd_run(args) -> None:
    tokenizer = load_tokenizer(args.tokenizer)
    eos_ids = sorted(tokenizer.eos_token_ids)
    loads = [("rate", float(r)) for r in args.request_rates.split(",") if r] + \
            [("concurrency", float(c)) for c in args.concurrency.split(",") if c]
    # fresh prompts for every load level: a prefix cache must not turn later levels into cache hits
    n = args.num_prompts
    prompts = make_prompts(tokenizer, n * len(loads) + 2, args.input_len, args.prompt_file, args.seed)
    if args.warmup:
        asyncio.run(run_load(argparse.Namespace(**{**vars(args), "output_len": 4}), prompts[-2:], eos_ids, "rate",
                             math.inf))
    rows = []
    for k, (mode, value) in enumerate(loads):
        r = asyncio.run(run_load(args, prompts[k * n:(k + 1) * n], eos_ids, mode, value))
        rows.append(asdict(r))
        print(table([asdict(r)]).splitlines()[-1], flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(out.read_text()) if out.exists() else []
        out.write_text(json.dumps(previous + rows, indent=1))
    print(table(rows))


def cmd_report(args) -> None:
    rows = [r for f in args.results for r in json.loads(Path(f).read_text())]
    print(table(rows))
    if args.png:
        plot(rows, args.png)
        print(f"\nplot: {args.png}")


def plot(rows: list[dict], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        for mode, marker in (("rate", "o-"), ("concurrency", "s--")):
            pts = sorted((r for r in rows if r["label"] == label and r["mode"] == mode), key=lambda r: r["output_tok_s"])
            if not pts:
                continue
            x = [p["output_tok_s"] for p in pts]
            for ax, key in zip(axes, ("ttft_p50_ms", "tpot_p50_ms")):
                ax.plot(x, [p[key] for p in pts], marker, label=f"{label} ({mode})")
                for p in pts:
                    tag = ("∞" if not math.isfinite(p["value"]) else f"{p['value']:g}") + \
                          (" req/s" if mode == "rate" else " conc")
                    ax.annotate(tag, (p["output_tok_s"], p[key]), fontsize=7, textcoords="offset points",
                                xytext=(3, 3))
    for ax, title in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(title)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("latency versus throughput")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="drive one server and record a row per load level")
    r.add_argument("--base-url", default="http://127.0.0.1:8000")
    r.add_argument("--model", default="default", help="the model id the server expects")
    r.add_argument("--api-key", default=None)
    r.add_argument("--label", default="server")
    r.add_argument("--tokenizer", default=None, help="model file whose tokenizer makes the prompts (default smollm2)")
    r.add_argument("--request-rates", default="0.5,1,2,inf", help="Poisson arrival rates in req/s; inf = all at once")
    r.add_argument("--concurrency", default="", help="closed-loop concurrency levels, e.g. 1,8")
    r.add_argument("--num-prompts", type=int, default=16)
    r.add_argument("--input-len", type=int, default=128)
    r.add_argument("--output-len", type=int, default=32)
    r.add_argument("--prompt-file", default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--timeout", type=float, default=600.0)
    r.add_argument("--no-warmup", dest="warmup", action="store_false")
    r.add_argument("--out", default=None, help="JSON file the rows are appended to")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="markdown table and latency-versus-throughput plot from result files")
    rep.add_argument("results", nargs="+")
    rep.add_argument("--png", default=None)
    rep.set_defaults(func=cmd_report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
