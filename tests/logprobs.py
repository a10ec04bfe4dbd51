"""Prompt logprobs against a reference: the comparison most model-level tests make. (A plain module,
not conftest: several conftest modules share that name.)"""
import torch


def prompt_logprob_diff(llm, ids: list[int], ref_logprobs: torch.Tensor) -> torch.Tensor:
    """|our prompt logprob - the reference's| for tokens 1.. of `ids`, scored by `llm` in one request;
    ref_logprobs [len(ids), vocab] is a reference's log-softmax, row i predicting token i + 1."""
    from tokenmill import SamplingParams
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return torch.tensor([out.prompt_logprobs[i][ids[i]].logprob - ref_logprobs[i - 1, ids[i]].item()
                         for i in range(1, len(ids))]).abs()


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """A transformers model's log-softmax over the prompt, [len(ids), vocab]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
