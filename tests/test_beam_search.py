"""Beam search against transformers' generate(num_beams=W, do_sample=False): every beam, in order."""
from __future__ import annotations

import collections
import itertools

import pytest
import torch

from tokenmill import LLM, BeamSearchParams, SamplingParams

WIDTHS = (1, 2, 4, 8)
PENALTIES = (0.0, 1.0, 2.0)
EARLY = (False, True, "never")
NEW_TOKENS = 64


def hf_beams(model, prompt: list[int], width: int, new_tokens: int, eos: list[int] | None, **kw) -> list[list[int]]:
    """transformers' returned beams, best first, each cut after its first EOS (the rest is padding)."""
    with torch.no_grad():
        seqs = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                              max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=0, **kw)
    beams = []
    for s in seqs[:, len(prompt):].tolist():
        cut = min((s.index(e) + 1 for e in eos or () if e in s), default=len(s))
        beams.append(s[:cut])
    return beams


def run_all(llm: LLM, prompt: list[int], params: list[BeamSearchParams]) -> list[list[list[int]]]:
    """All searches at once, so that the groups batch with each other."""
    ids = [llm.engine.add_request(None, prompt, p) for p in params]
    outs = {o.request_id: o for o in llm._run(ids, use_tqdm=False)}
    return [[c.token_ids for c in outs[i].outputs] for i in ids]


def frequent_token(model, prompt: list[int]) -> int:
    """A token the beams of `prompt` emit often (decided by transformers): as EOS, beams end early."""
    beams = hf_beams(model, prompt, 4, 20, None)
    return collections.Counter(t for b in beams for t in b).most_common(1)[0][0]


def test_beam_search_matches_transformers(tiny_model):
    kind, directory, model = tiny_model
    prompt = torch.randint(3, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    eos = frequent_token(model, prompt)
    llm = LLM(str(directory), num_kv_blocks=1024, progress=False)
    cases = list(itertools.product(WIDTHS, PENALTIES, EARLY, (None, eos)))
    params = [BeamSearchParams(w, max_tokens=NEW_TOKENS, length_penalty=lp, early_stopping=es,
                               stop_token_ids=[e] if e is not None else None) for w, lp, es, e in cases]
    ours = run_all(llm, prompt, params)
    stopped, references = 0, {}
    for (w, lp, es, e), got in zip(cases, ours):
        # without an EOS every beam ends at the length limit, all of one length: the length penalty
        # scales every score alike and early stopping never comes into play, so transformers' beams
        # are the same for every (lp, es) and are computed once per width
        key = (w, lp, es, e) if e is not None else (w, None)
        if key not in references:
            references[key] = hf_beams(model, prompt, w, NEW_TOKENS, [e] if e is not None else None,
                                       length_penalty=lp, early_stopping=es)
            assert e is not None or all(len(b) == NEW_TOKENS for b in references[key])
        expected = references[key]
        assert got == expected, (kind, w, lp, es, e)
        stopped += e is not None and any(b[-1] == e for b in got)
    assert stopped >= len(cases) // 8        # EOS was reached in a quarter of the EOS cases at least
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_one_beam_is_greedy(tiny_llama):
    directory, _ = tiny_llama
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    llm = LLM(str(directory), num_kv_blocks=64, progress=False)
    prompts = [[5, 6, 7, 8], list(range(40, 70))]
    beams = llm.beam_search(prompts, BeamSearchParams(1, max_tokens=32), use_tqdm=False)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    for b, g in zip(beams, greedy):
        assert len(b.sequences) == 1
        assert b.sequences[0].token_ids == g.outputs[0].token_ids
        assert b.sequences[0].cum_logprob == pytest.approx(g.outputs[0].cumulative_logprob, abs=1e-3)
        assert b.sequences[0].tokens == b.sequences[0].prompt_token_ids + b.sequences[0].token_ids


def test_beams_batch_with_ordinary_requests_and_survive_preemption(tiny_llama):
    """The same beams alone, beside sampled requests, and in a page pool so small that groups are
    preempted and recomputed."""
    directory, _ = tiny_llama
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (30, 45, 17)]
    params = BeamSearchParams(4, max_tokens=40, length_penalty=0.5)
    alone = LLM(str(directory), num_kv_blocks=1024, progress=False)
    expected = [[s.token_ids for s in alone.beam_search(p, params, use_tqdm=False)[0].sequences] for p in prompts]

    for num_blocks in (1024, 60):        # 60 pages of 4 tokens hold one group at a time, not three
        llm = LLM(str(directory), progress=False, block_size=4, num_kv_blocks=num_blocks, max_num_batched_tokens=64)
        engine = llm.engine
        ids = []
        for i, p in enumerate(prompts):
            ids.append(engine.add_request(None, p, params))
            ids.append(engine.add_request(None, p[::-1], SamplingParams(temperature=0.8, seed=i, max_tokens=30)))
        outs = {o.request_id: o for o in llm._run(ids, use_tqdm=False)}
        assert [[c.token_ids for c in outs[i].outputs] for i in ids[::2]] == expected
        if num_blocks == 60:
            assert engine.scheduler.num_preemptions > 0
        assert engine.block_manager.num_free_blocks == num_blocks


def test_beams_share_the_prompt_pages(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), progress=False, block_size=16, num_kv_blocks=64)
    engine, bm = llm.engine, llm.engine.block_manager
    prompt = list(range(10, 10 + 100))               # 6 full pages and a partial one of 4 tokens
    engine.add_request("beam", prompt, BeamSearchParams(4, max_tokens=20, ignore_eos=True))
    engine.step()                                    # the prompt, then the first 4 beams
    beams = engine.scheduler.running
    assert len(beams) == 4 and all(b.num_tokens == 101 for b in beams)
    shared = beams[0].block_table[:6]
    assert all(b.block_table[:7] == beams[0].block_table[:7] for b in beams)
    assert [bm.blocks[p].ref_count for p in beams[0].block_table] == [4] * 7
    assert bm.num_blocks - bm.num_free_blocks == 7   # the prompt's pages, once
    for _ in range(3):         # a beam copies the partial page only when it writes into a shared one
        engine.step()
        beams = engine.scheduler.running
        tails = {b.block_table[6] for b in beams}
        assert all(b.block_table[:6] == shared for b in beams) and len(beams) == 4
        assert [bm.blocks[p].ref_count for p in shared] == [4] * 6
        assert sum(bm.blocks[t].ref_count for t in tails) == 4
        assert bm.num_blocks - bm.num_free_blocks == 6 + len(tails)   # prompt once + the beams' partial tails
    engine.abort_request("beam")
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.has_unfinished_requests()

    engine.add_request("beam", prompt, BeamSearchParams(4, max_tokens=20, ignore_eos=True))
    while engine.has_unfinished_requests():
        outs = engine.step()
        busy = {b for s in engine.scheduler.running for b in s.block_table}
        assert bm.num_blocks - bm.num_free_blocks == len(busy)    # dropped beams gave their pages back at once
    assert len(outs[0].outputs) == 4 and outs[0].finished
    assert bm.num_free_blocks == bm.num_blocks


def test_beam_search_rejects_bad_parameters(tiny_llama):
    directory, _ = tiny_llama
    for kw, field in [(dict(beam_width=0), "beam_width"), (dict(beam_width=2, max_tokens=0), "max_tokens"),
                      (dict(beam_width=2, early_stopping="sometimes"), "early_stopping"),
                      (dict(beam_width=2, length_penalty=float("nan")), "length_penalty"),
                      (dict(beam_width=2, temperature=-1.0), "temperature"),
                      (dict(beam_width=2, stop_token_ids=[-1]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kw)
    llm = LLM(str(directory), progress=False, max_num_seqs=4, num_kv_blocks=64)
    with pytest.raises(ValueError, match=r"beam_width must be <= max_num_seqs \(4\)"):
        llm.beam_search([[1, 2, 3]], BeamSearchParams(8))
    with pytest.raises(ValueError, match=r"stop_token_ids: token ids must be in \[0, 384\)"):
        llm.beam_search([[1, 2, 3]], BeamSearchParams(2, stop_token_ids=[999]))


def test_smollm2_beam_search_matches_transformers(smollm2_dequantized, smollm2_hf):
    """Dequantized, as transformers reads the same GGUF file: a chat prompt that ends in EOS and a
    plain one that runs to the length limit."""
    llm = smollm2_dequantized
    tok = llm.get_tokenizer()
    hf = smollm2_hf
    eos = sorted(tok.eos_token_ids)
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hello."}]),
                      add_special_tokens=False)
    plain = tok.encode("The history of the printing press begins")
    cases = [(chat, 4, 1.0, False, 64), (plain, 4, 2.0, "never", 24), (chat, 2, 0.0, True, 32)]
    stopped = 0
    for prompt, w, lp, es, n in cases:
        out = llm.beam_search(prompt, BeamSearchParams(w, max_tokens=n, length_penalty=lp, early_stopping=es),
                              use_tqdm=False)[0]
        expected = hf_beams(hf, prompt, w, n, eos, length_penalty=lp, early_stopping=es)
        assert [s.token_ids for s in out.sequences] == expected, (w, lp, es)
        stopped += sum(s.finish_reason == "stop" for s in out.sequences)
        for s in out.sequences:       # the text leaves the EOS out
            assert s.text == tok.decode(s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids)
            assert (s.finish_reason == "stop") == (s.token_ids[-1] in eos)
    assert stopped >= 2        # EOS reached by some beams


def test_tokenizer_eos_ends_beams_and_the_cli_prints_them(tiny_chat_llama, capsys):
    """With a real tokenizer: its EOS ends beams (as transformers' eos_token_id does), text leaves it
    out, and `tokenmill generate --beam-width` prints the same beams."""
    from tokenmill.cli import main
    directory, model, eos, prompt = tiny_chat_llama
    llm = LLM(str(directory), num_kv_blocks=64, progress=False)
    tok = llm.get_tokenizer()
    out = llm.beam_search(prompt, BeamSearchParams(2, max_tokens=8), use_tqdm=False)[0]
    assert [s.token_ids for s in out.sequences] == hf_beams(model, tok.encode(prompt), 2, 8, [eos])
    assert any(s.finish_reason == "stop" and s.token_ids[-1] == eos for s in out.sequences)
    assert all(s.stop_reason is None for s in out.sequences)      # EOS is no stop_token_ids entry
    main(["generate", "--model", str(directory), "--num-kv-blocks", "64", "--beam-width", "2", "--max-tokens", "8",
          prompt])
    printed = capsys.readouterr().out
    where = [printed.index(f"[beam {i}: score {s.score:.4f}") for i, s in enumerate(out.sequences)]
    assert where == sorted(where)
    assert all(printed[at:].split("] ", 1)[1].startswith(prompt + s.text) for at, s in zip(where, out.sequences))
    with pytest.raises(SystemExit, match="beam_width must be an integer >= 1"):
        main(["generate", "--model", str(directory), "--num-kv-blocks", "64", "--beam-width", "0", prompt])


def test_beams_survive_a_request_that_breaks_the_step(tiny_llama, monkeypatch):
    """A step that fails is retried request by request: the beam groups in it go on unchanged."""
    from test_hardening import POISON, poison_forward
    directory, _ = tiny_llama
    llm = LLM(str(directory), num_kv_blocks=64, progress=False)
    prompts = [[5, 9, 11, 40], list(range(100, 130))]
    params = BeamSearchParams(3, max_tokens=16, length_penalty=0.0)
    clean = [[s.token_ids for s in o.sequences] for o in llm.beam_search(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(llm.engine.runner.model, "forward", poison_forward(llm.engine))
    engine = llm.engine
    ids = [engine.add_request(None, p, params) for p in prompts]
    bad = engine.add_request(None, [7, 8, POISON], SamplingParams(max_tokens=4))
    outs = {o.request_id: o for o in llm._run(ids + [bad], use_tqdm=False)}
    assert outs[bad].error == "RuntimeError: injected fault"
    assert [[c.token_ids for c in outs[i].outputs] for i in ids] == clean
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
