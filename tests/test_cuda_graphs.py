"""cuda_graphs.DecodeGraphs' static inputs, on the CPU: the Triton backend under the interpreter, each recorded
step rerun eagerly on the static buffers at every replay (a CUDA graph itself needs a GPU:
benchmarks/gpu_engine.py checks the recorded graphs there). Greedy tokens and logprobs against transformers
while batches pad up to a recorded size and shrink as requests end, with a sliding window's second KV group;
and a step that cannot be recorded falls back to eager steps."""
import logging

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.cuda_graphs import DecodeGraphs, Recorded

from test_gemma3 import build_gemma, hf_greedy, prompts

pytest.importorskip("triton")
# padding rows have no keys: the interpreter's numpy warns of the 0/0 in their (unread) outputs
pytestmark = [pytest.mark.usefixtures("triton_interpreter"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
# the batch goes 4 -> 3 -> 2 -> 1 rows; the second request ends first, so the others move up a row and the
# padding row of the 3-row steps held the last request's slot the step before
NEW_TOKENS = [12, 3, 9, 6]


def graphed_llm(directory) -> tuple[LLM, list[tuple[int, int]]]:
    """An engine whose decode steps go through DecodeGraphs, every size recorded at start as the engine does on
    CUDA; and (rows, recorded size) of each replayed step."""
    replayed, rows = [], []

    def rerun(step, pool) -> Recorded:
        output = step()
        size = output.shape[0]
        return Recorded(lambda: replayed.append((rows[-1], size)) or output.copy_(step()), output)

    llm = LLM(str(directory), attention_backend="triton", device="cpu", max_num_batched_tokens=32,
              num_kv_blocks=64, max_num_seqs=8, progress=False)
    engine = llm.engine
    graphs = engine.runner.graphs = DecodeGraphs(engine.runner, 8, engine.max_model_len, record=rerun)
    graphs.record_all()
    run = graphs.run
    graphs.run = lambda ids, *args: rows.append(ids.shape[0]) or run(ids, *args)
    assert sorted(engine.runner.graphs.recorded) == [1, 2, 4, 8]
    return llm, replayed


def check_against_transformers(llm: LLM, hf, prompt_lens: list[int]) -> None:
    ps = prompts(hf.config.vocab_size, prompt_lens)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in NEW_TOKENS]
    outs = llm.generate(ps, params, use_tqdm=False)
    for p, n, out in zip(ps, NEW_TOKENS, outs):
        tokens, logprobs = hf_greedy(hf, p, n)
        assert out.outputs[0].token_ids == tokens
        ours = torch.tensor([next(iter(d.values())).logprob for d in out.outputs[0].logprobs])
        assert torch.allclose(ours, logprobs[torch.arange(n), torch.tensor(tokens)], atol=1e-4)


def assert_every_batch_replayed(replayed: list[tuple[int, int]]) -> None:
    """Steps of 4, 3 (padded to 4), 2 and 1 rows replayed, in that order (prefill steps ran eagerly)."""
    assert sorted(set(replayed), reverse=True) == [(4, 4), (3, 4), (2, 2), (1, 1)]
    assert replayed == sorted(replayed, reverse=True)


def test_decode_steps_replayed_on_static_inputs_match_transformers(tiny_llama):
    directory, hf = tiny_llama
    llm, replayed = graphed_llm(directory)
    check_against_transformers(llm, hf, [7, 30, 18, 11])
    assert_every_batch_replayed(replayed)


def test_sliding_window_groups_replayed(tmp_path):
    """Gemma 3 with a window of 16: several KV groups, each with its own slots and tables; contexts past the
    window, so local pages are released while steps replay."""
    hf = build_gemma(tmp_path, ["full_attention", "sliding_attention", "sliding_attention"])
    llm, replayed = graphed_llm(tmp_path)
    windows = llm.engine.runner.layout.group_windows
    assert len(llm.engine.runner.graphs.groups) == len(windows) > 1 and 16 in windows
    check_against_transformers(llm, hf, [3, 40, 21, 17])
    assert_every_batch_replayed(replayed)


def test_a_step_that_cannot_be_recorded_runs_eagerly(tiny_llama, caplog):
    directory, hf = tiny_llama
    llm, replayed = graphed_llm(directory)
    llm.engine.runner.graphs.recorded.clear()

    def fails(step, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    llm.engine.runner.graphs.record = fails
    with caplog.at_level(logging.WARNING, logger="tokenmill"):
        check_against_transformers(llm, hf, [7, 30, 18, 11])
    assert llm.engine.runner.graphs.failed and "CUDA graphs off" in caplog.text and not replayed
