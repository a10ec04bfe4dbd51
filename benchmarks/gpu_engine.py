"""tokenmill end to end on a CUDA device, against transformers on the same device and the same GGUF file
(transformers dequantizes it: the exact reference for the "dequantize" path). One device call:

  PYTHONPATH=. python benchmarks/gpu_engine.py [--model PATH] [--requests 64]
  python benchmarks/gpu_engine.py --device cpu --smoke      # the same code, small, on a CPU

0. tiny random models (transformers, no download) of each architecture tokenmill runs: llama (GQA, llama3
   rope scaling), qwen2 (MQA, attention bias), mistral (MHA, linear rope scaling), gemma3 (sliding-window and
   global layers): greedy tokens and their logprobs, tokenmill float32 on the device against transformers
   float32 on the device, prompts of 3 to 70 tokens run as one batch, with decode steps replayed as CUDA graphs
   (the default on CUDA) and launched eagerly;
1. agreement: greedy tokens (48 steps, 4 chat prompts) and prompt logprobs over real English, for each of
   tokenmill's ways to run the file (dequantized float32, as stored in float32 and bfloat16, int4 made at
   load) against transformers float32 on the device;
2. perplexity (windows of 512 over the evaluation text) of each way;
3. speed: batch-1 decode and offline N x (128 in, 128 out) tok/s, tokenmill (decode steps as CUDA graphs, and
   eager) against transformers `generate` in bfloat16: benchmarks/engine.py's measurements, on the device.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import bench_tokenmill, bench_transformers, transformers_model  # noqa: E402
from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.model_files import resolve_model  # noqa: E402
from tokenmill.perplexity import perplexity, reference_text  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a hash table is in two sentences.", "List three prime numbers."]
WAYS = {"dequantize float32": ("dequantize", "float32"), "as stored float32": (None, "float32"),
        "as stored bfloat16": (None, "bfloat16"), "int4 (RTN at load) bfloat16": ("int4", "bfloat16")}


def hf_greedy(model, ids: list[int], new: int) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        # no end token: tokenmill's side runs ignore_eos, and min_new_tokens would instead forbid the end token
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def agreement(path: Path, device: torch.device, new: int, windows: int) -> None:
    ref = transformers_model(path, "float32", str(device))
    probe = LLM(str(path), device=str(device), num_kv_blocks=256, progress=False)
    tok = probe.get_tokenizer()
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
    chat_ids = [tok.encode(c, add_special_tokens=False) for c in chats]
    text_ids = tok.encode(reference_text("evaluation")[:3000], add_special_tokens=False)[:384]
    eval_ids = tok.encode(reference_text("evaluation"), add_special_tokens=False)
    del probe
    expected = [hf_greedy(ref, ids, new) for ids in chat_ids]
    with torch.inference_mode():
        ref_lp = torch.log_softmax(ref(torch.tensor([text_ids], device=device)).logits[0].float(), -1).cpu()
    del ref
    print(f"## agreement with transformers float32 on {device} ({path.name}; {new} greedy tokens a prompt)\n")
    print("| tokenmill | greedy tokens equal to transformers' (4 prompts) | max / mean abs prompt-logprob diff "
          f"({len(text_ids)} tokens) | perplexity ({windows} x 512) | answer to the first prompt |")
    print("|---|---|---|---|---|")
    for name, (quantization, dtype) in WAYS.items():
        llm = LLM(str(path), device=str(device), dtype=dtype, quantization=quantization,
                  max_num_batched_tokens=2048, num_kv_blocks=1024, progress=False)
        outs = llm.generate(chat_ids, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True), use_tqdm=False)
        same = [common_prefix(o.outputs[0].token_ids, e) for o, e in zip(outs, expected)]
        out = llm.generate([text_ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        diff = torch.tensor([out.prompt_logprobs[i][text_ids[i]].logprob - ref_lp[i - 1, text_ids[i]].item()
                             for i in range(1, len(text_ids))]).abs()
        ppl = perplexity(llm, eval_ids, ctx=512, max_windows=windows, use_tqdm=False).ppl
        answer = tok.decode(outs[0].outputs[0].token_ids[:16]).replace("\n", " ").replace("|", "/")
        print(f"| {name} | {'/'.join(map(str, same))} of {new} | {diff.max():.4f} / {diff.mean():.5f} | {ppl:.4f} | "
              f"{answer!r} |", flush=True)
        llm.engine.shutdown()
        del llm
        if device.type == "cuda":
            torch.cuda.empty_cache()


TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, max_position_embeddings=512,
            initializer_range=0.2, rms_norm_eps=1e-6)     # a large init: greedy choices not decided by rounding


def tiny_models():
    """(name, transformers model) with random weights, as tests/conftest.py and tests/test_gemma3.py build them."""
    import transformers as tf
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    S, F = "sliding_attention", "full_attention"
    configs = {
        "llama GQA 4/2": tf.LlamaConfig(**TINY, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=32, tie_word_embeddings=False, rope_theta=50000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen2 MQA + bias": tf.Qwen2Config(**TINY, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                           tie_word_embeddings=True, rope_theta=1000000.0),
        "mistral MHA": tf.MistralConfig(**TINY, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        tie_word_embeddings=False, sliding_window=None,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "gemma3 window 16": tf.Gemma3TextConfig(**TINY, num_hidden_layers=6, num_attention_heads=4,
                                                num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24,
                                                sliding_window=16, layer_types=[S, S, F, S, S, F], rope_theta=20000.0,
                                                rope_local_base_freq=500.0, tie_word_embeddings=True,
                                                attn_implementation="eager"),
    }
    classes = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM,
               "gemma3": tf.Gemma3ForCausalLM}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = classes[name.split()[0]](cfg).eval().float()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) or \
                        (name.startswith("gemma3") and pname.endswith("norm.weight")):
                    p.normal_(0, 0.2)       # random biases and (1 + w) norms are exercised, not zeros
        yield name, model


def tiny(device: torch.device, backend: str | None) -> None:
    new, rng = 32, random.Random(1)
    print(f"## tiny random models, float32, tokenmill against transformers, both on {device}\n")
    print("| model | greedy tokens equal (prompts of 3/20/45/70 tokens) | max abs logprob diff |")
    print("|---|---|---|")
    for name, hf in tiny_models():
        ps = [[rng.randrange(384) for _ in range(n)] for n in (3, 20, 45, 70)]
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            hf = hf.to(device)
            want, want_lp = [], []
            for p in ps:
                ids = hf_greedy(hf, p, new)
                with torch.inference_mode():
                    logits = hf(torch.tensor([p + ids], device=device)).logits[0, len(p) - 1:-1].float()
                lp = torch.log_softmax(logits, -1).cpu()
                want.append(ids)
                want_lp.append(lp[torch.arange(new), torch.tensor(ids)])
            for eager in (False, True) if device.type == "cuda" else (True,):
                label = f"{name}, {'eager' if eager else 'CUDA graphs'}" if device.type == "cuda" else name
                try:
                    llm = LLM(d, device=str(device), attention_backend=backend, num_kv_blocks=128,
                              enforce_eager=eager, progress=False)
                    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True,
                                                           logprobs=0), use_tqdm=False)
                    graphs = llm.engine.runner.graphs
                    if not eager and (graphs is None or graphs.failed):
                        label += " (not recorded: ran eagerly)"
                except Exception as e:     # one model failing leaves the others' rows
                    print(f"| {label} | failed: {type(e).__name__}: {str(e)[:200]} | |", flush=True)
                    continue
                same = [common_prefix(o.outputs[0].token_ids, w) for o, w in zip(outs, want)]
                diff = max((torch.tensor([next(iter(r.values())).logprob for r in o.outputs[0].logprobs[:n]])
                            - w[:n]).abs().max().item() if n else 0.0 for o, w, n in zip(outs, want_lp, same))
                print(f"| {label} | {'/'.join(map(str, same))} of {new} | {diff:.1e} |", flush=True)
    print()


def speed(path: Path, device: torch.device, n: int) -> None:
    print(f"\n## speed on {device}: batch-1 decode (128 in, 128 out, median of 3) and offline {n} x (128 in, 128 out)\n")
    print("| engine | batch-1 decode tok/s | offline output tok/s | offline vs transformers bfloat16 |")
    print("|---|---|---|---|")
    runs = {"transformers bfloat16": lambda: bench_transformers(path, n, 3, "bfloat16", str(device)),  # the base
            "tokenmill as stored bfloat16": lambda: bench_tokenmill(path, n, 3, "bfloat16", str(device)),
            "tokenmill dequantize bfloat16": lambda: bench_tokenmill(path, n, 3, "bfloat16", str(device), "dequantize"),
            "tokenmill as stored bfloat16, eager": lambda: bench_tokenmill(path, n, 3, "bfloat16", str(device),
                                                                         enforce_eager=True),
            "tokenmill dequantize bfloat16, eager": lambda: bench_tokenmill(path, n, 3, "bfloat16", str(device),
                                                                          "dequantize", enforce_eager=True)}
    base = None
    for name, fn in runs.items():     # each row as it is measured: a time limit keeps the ones before it
        try:
            r = fn()
        except Exception as e:      # one engine failing leaves the others' figures
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} | | |", flush=True)
            continue
        base = r["offline_tok_s"] if name.startswith("transformers") else base
        ratio = f"{r['offline_tok_s'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['decode_tok_s']:.1f} | {r['offline_tok_s']:.1f} | {ratio} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a short name or GGUF path (default: the default model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="few tokens, windows and requests (a CPU check of the script)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: tiny,agreement,speed")
    ap.add_argument("--attention-backend", default=None, help="for the tiny models (default: the device's)")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}\n")
    skip = set(filter(None, args.skip.split(",")))
    if "tiny" not in skip:
        tiny(device, args.attention_backend)
    if {"agreement", "speed"} <= skip:
        return
    try:
        path = resolve_model(args.model)
    except Exception as e:      # e.g. a device machine without the file: the tiny models' rows stand
        sys.exit(f"model: {type(e).__name__}: {e}")
    print(f"model: {path}\n")
    if "agreement" not in skip:
        agreement(path, device, new=8 if args.smoke else 48, windows=1 if args.smoke else 8)
    if "speed" not in skip:
        speed(path, device, 4 if args.smoke else args.requests)


if __name__ == "__main__":
    main()
