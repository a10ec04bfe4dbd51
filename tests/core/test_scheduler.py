import subprocess
import sys

from tokenmill.core.block_manager import BlockManager
from tokenmill.core.scheduler import Scheduler, SchedulerConfig
from tokenmill.core.sequence import Sequence, SequenceStatus
from tokenmill.sampling_params import SamplingParams

EOS = 0


def make(num_blocks=16, block_size=4, budget=8, max_seqs=4, max_len=64, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len), bm, {EOS}), bm


def seq(rid, length, **kw):
    return Sequence(rid, list(range(1, length + 1)), SamplingParams(**kw))


def step(sched, token=7):
    out = sched.schedule()
    sched.update(out, [[token]] * len(out.samples))
    return out


def test_core_imports_no_torch():
    code = ("import sys, tokenmill.core.scheduler, tokenmill.core.block_manager, tokenmill.core.sequence; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('tokenmill.model')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunked_prefill_shares_the_budget_with_decodes():
    sched, _ = make(budget=8)
    a = seq("a", 3, max_tokens=10)
    sched.add(a)
    out = step(sched)
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 3)]
    b = seq("b", 20, max_tokens=10)
    sched.add(b)
    out = step(sched)
    # a decodes one token, b gets the remaining 7 of the budget
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 7)]
    assert [s.request_id for s, _ in out.samples] == ["a"]   # b's prompt is not done: nothing sampled
    out = step(sched)
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 7)]
    out = step(sched)
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 6)]
    assert [s.request_id for s, _ in out.samples] == ["a", "b"]
    assert b.num_computed_tokens == 20 and b.num_output_tokens == 1


def test_max_num_seqs_limits_admission_fcfs():
    sched, _ = make(budget=100, max_seqs=2)
    seqs = [seq(str(i), 2, max_tokens=5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert [s.request_id for s, _ in out.scheduled] == ["0", "1"]
    assert list(sched.waiting) == [seqs[2]]


def test_stops_eos_min_tokens_max_tokens_stop_ids():
    sched, bm = make(budget=100)
    a = seq("a", 2, max_tokens=3)
    b = seq("b", 2, max_tokens=10, min_tokens=2)
    c = seq("c", 2, max_tokens=10, stop_token_ids=[5])
    d = seq("d", 2, max_tokens=10, ignore_eos=True)
    for s in (a, b, c, d):
        sched.add(s)
    out = sched.schedule()
    sched.update(out, [[EOS], [EOS], [5], [EOS]])
    assert a.status is SequenceStatus.FINISHED_STOPPED
    assert b.status is SequenceStatus.RUNNING          # min_tokens not reached: EOS does not stop
    assert c.status is SequenceStatus.FINISHED_STOPPED and c.stop_reason == 5
    assert d.status is SequenceStatus.RUNNING
    out = sched.schedule()
    sched.update(out, [[EOS], [9]])
    assert b.status is SequenceStatus.FINISHED_STOPPED
    step(sched, 9)
    assert d.status is SequenceStatus.RUNNING and d.num_output_tokens == 3
    for _ in range(7):
        step(sched, 9)
    assert d.status is SequenceStatus.FINISHED_LENGTH and d.num_output_tokens == 10
    assert bm.num_free_blocks == bm.num_blocks


def test_preemption_by_recompute_when_pages_run_out():
    # 4 pages of 4 tokens; two sequences of 6 prompt tokens each need 2 pages, then grow.
    sched, bm = make(num_blocks=4, block_size=4, budget=100, prefix=False)
    a, b = seq("a", 6, max_tokens=8), seq("b", 6, max_tokens=8)
    sched.add(a)
    sched.add(b)
    step(sched)                      # both prefilled: 2 + 2 pages, tokens 6+1 each
    step(sched)                      # position 6 written: page 1 holds positions 4..7
    step(sched)                      # position 7 written: page 1 full
    assert a.num_tokens == 9 and bm.num_free_blocks == 0
    out = step(sched)                # a needs a third page: b (newest) is preempted
    assert out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert list(sched.waiting) == [b] and b.num_tokens == 9   # its outputs are kept and recomputed
    assert [s.request_id for s, _ in out.scheduled] == ["a"]
    while a.status is SequenceStatus.RUNNING:
        step(sched)
    assert a.num_output_tokens == 8
    while sched.has_unfinished():
        step(sched)
    assert b.status is SequenceStatus.FINISHED_LENGTH and b.num_output_tokens == 8
    assert bm.num_free_blocks == 4


def test_single_sequence_too_long_for_cache_is_rejected_at_add():
    sched, _ = make(num_blocks=2, block_size=4)
    try:
        sched.add(seq("a", 8))
    except ValueError as e:
        assert "KV pages" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_n_siblings_fork_when_the_prompt_completes_and_share_pages():
    sched, bm = make(budget=4, block_size=4)
    leader = seq("a", 6, max_tokens=4, n=3)
    leader.pending_forks = [leader.fork(1), leader.fork(2)]
    sched.add(leader)
    out = step(sched)                 # 4 of 6 prompt tokens: no fork yet
    assert len(sched.running) == 1 and not out.samples
    out = sched.schedule()            # the last 2 prompt tokens: siblings fork and sample from the same row
    assert len(sched.running) == 3
    assert [(s.index, row) for s, row in out.samples] == [(0, 0), (1, 0), (2, 0)]
    sched.update(out, [[11], [12], [13]])
    s1, s2 = sched.running[1], sched.running[2]
    assert s1.block_table == leader.block_table == s2.block_table
    assert bm.blocks[leader.block_table[0]].ref_count == 3
    assert [s.output_token_ids for s in sched.running] == [[11], [12], [13]]
    out = sched.schedule()            # each writes position 6 into the shared partial page: two copies
    assert len(out.block_copies) == 2
    assert len({tuple(s.block_table) for s in sched.running}) == 3
    assert len({s.block_table[0] for s in sched.running}) == 1


def test_abort_frees_pages_at_once():
    sched, bm = make()
    a = seq("a", 10, max_tokens=5)
    sched.add(a)
    step(sched)
    assert bm.num_free_blocks < bm.num_blocks
    sched.abort("a")
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_unfinished()
    assert a.status is SequenceStatus.FINISHED_ABORTED


def beam_request(rid: str, prompt_len: int, width: int, max_tokens: int):
    from tokenmill.core.beam import BeamGroup
    from tokenmill.sampling_params import BeamSearchParams
    params = BeamSearchParams(width, max_tokens=max_tokens)
    group = BeamGroup(params, prompt_len, prompt_len + max_tokens, frozenset({EOS}))
    group.beams = [Sequence(rid, list(range(1, prompt_len + 1)), params.as_sampling_params(), beam=group)]
    return group


def candidates(out, token_base: int = 100):
    """Every beam of every stepped group continues with two distinct tokens, parents in order."""
    from tokenmill.core.beam import BeamCandidate
    result = []
    for group, _ in out.beam_groups:
        cands = [BeamCandidate(b, token_base + 2 * b + j, -1.0, 1 + j, seq.cumulative_logprob - 1.0 - j - b / 10)
                 for b, seq in enumerate(group.beams) for j in range(2)]
        result.append(sorted(cands, key=lambda c: -c.score)[:group.num_candidates])
    return result


def test_beam_group_forks_share_pages_and_dropped_beams_free_theirs():
    sched, bm = make(num_blocks=16, block_size=4, budget=64, max_seqs=4)
    group = beam_request("b", 6, 2, 8)                    # 6 tokens: one full page and half of another
    sched.add(group.beams[0])
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("b", 6)] and len(out.beam_groups) == 1
    sched.update(out, [], candidates(out))
    a, b = group.beams
    assert a.block_table == b.block_table == [0, 1] and [bm.blocks[i].ref_count for i in (0, 1)] == [2, 2]
    assert (a.token_ids[-1], b.token_ids[-1]) == (100, 101)
    out = sched.schedule()                                # both write into the shared half page: one copies it
    assert out.block_copies == [(1, 2)] and a.block_table == [0, 2] and b.block_table == [0, 1]
    sched.update(out, [], candidates(out))
    # the best two of a's and b's continuations both extend a: b is dropped and its page 1 freed
    assert [s.token_ids[-2:] for s in group.beams] == [[100, 100], [100, 101]]
    assert group.beams[0] is a and b.is_finished and bm.blocks[1].ref_count == 0
    assert bm.num_free_blocks == 16 - 2


def test_held_beams_wait_for_a_preempted_mate_then_the_group_steps():
    sched, bm = make(num_blocks=64, block_size=4, budget=2, max_seqs=4)
    group = beam_request("b", 5, 2, 8)
    sched.add(group.beams[0])
    for _ in range(3):                                    # the prompt in chunks of 2, then the first step
        out = sched.schedule()
        sched.update(out, [], candidates(out))
    a, b = group.beams
    assert a.num_computed_tokens == b.num_computed_tokens == 5 and b.num_tokens == 6
    sched.running.remove(b)                               # as if the pool had pushed it out
    sched._preempt(b)
    out = sched.schedule()                                # a could step but waits; b recomputes from the cache
    assert out.beam_groups == [] and [(s.seq_id, n) for s, n in out.scheduled] == [(b.seq_id, 1)]
    assert b.num_cached_tokens == 4                       # its full prompt page came from the prefix cache
    sched.update(out, [])
    out = sched.schedule()
    assert {s.seq_id: n for s, n in out.scheduled} == {a.seq_id: 1, b.seq_id: 1}
    assert [g for g, _ in out.beam_groups] == [group]


# ---- speculative decoding: drafts ride with the last token, rejected ones roll back -----------------

def test_drafts_are_verified_with_the_last_token_and_rejected_ones_roll_back():
    sched, bm = make(num_blocks=8, block_size=4, budget=16)
    a = seq("a", 6, max_tokens=20)
    sched.add(a)
    step(sched)                                   # prompt of 6 + its first token
    assert (a.num_tokens, a.num_computed_tokens) == (7, 6)
    a.spec_token_ids = [8, 9, 10]
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 4)]    # last token + 3 drafts
    assert [(s.request_id, row) for s, row in out.samples] == [("a", 0)]
    assert len(a.block_table) == 3                # positions 0..9
    sched.update(out, [[8, 11]])                  # the first draft accepted, then 11
    assert a.token_ids[-2:] == [8, 11] and a.spec_token_ids == []
    assert (a.num_tokens, a.num_computed_tokens) == (9, 8)
    assert a.num_hashed_blocks == 2               # positions 0..7; page 3 holds rejected drafts' KV
    a.spec_token_ids = [12, 13]
    out = sched.schedule()
    assert out.scheduled == [(a, 3)]
    sched.update(out, [[12, 13, 14]])             # all accepted, then a bonus token
    assert (a.num_tokens, a.num_computed_tokens) == (12, 11)
    assert a.token_ids[-3:] == [12, 13, 14]


def test_drafts_are_never_trimmed_by_the_budget():
    sched, _ = make(budget=3)
    a = seq("a", 2, max_tokens=20)
    sched.add(a)
    step(sched)
    a.spec_token_ids = [5, 6, 7]                  # needs 4 > budget 3: waits rather than losing drafts
    assert sched.schedule().scheduled == []
    a.spec_token_ids = [5, 6]
    assert sched.schedule().scheduled == [(a, 3)]


def test_a_stop_inside_the_accepted_drafts_drops_what_follows():
    sched, bm = make()
    a, b = seq("a", 3, max_tokens=20), seq("b", 3, max_tokens=4)
    sched.add(a)
    sched.add(b)
    step(sched)
    a.spec_token_ids, b.spec_token_ids = [5, EOS, 6], [5, 6, 8]
    out = sched.schedule()
    finished = sched.update(out, [[5, EOS, 6, 9], [5, 6, 8, 9]])
    assert set(finished) == {a, b}
    assert a.output_token_ids == [7, 5, EOS] and a.status is SequenceStatus.FINISHED_STOPPED
    assert b.output_token_ids == [7, 5, 6, 8] and b.status is SequenceStatus.FINISHED_LENGTH   # max_tokens 4
    assert bm.num_free_blocks == bm.num_blocks


def test_lookahead_slots_for_a_draft_model_stop_at_max_model_len():
    bm = BlockManager(16, 2, True)
    sched = Scheduler(SchedulerConfig(4, 16, 10, num_lookahead_tokens=3), bm, {EOS})
    a = seq("a", 3, max_tokens=20)
    sched.add(a)
    step(sched)
    assert len(a.block_table) == 3                # 3 prompt tokens + 3 slots
    a.spec_token_ids = [5, 6]
    step(sched)
    assert len(a.block_table) == 5                # 4 tokens + 2 drafts + 3 slots
    a.spec_token_ids = [5, 6, 7]
    sched.schedule()
    assert len(a.block_table) == 5                # 5 + 3 + 3 = 11, but max_model_len is 10


def test_preemption_drops_the_drafts():
    sched, bm = make(num_blocks=3, block_size=4, budget=16)
    a, b = seq("a", 4, max_tokens=20), seq("b", 4, max_tokens=20)
    sched.add(a)
    sched.add(b)
    step(sched)                                   # both prompts: 2 pages of 3 ... a has 2, b 1
    a.spec_token_ids, b.spec_token_ids = [1, 2, 3], [1, 2, 3]
    out = sched.schedule()
    assert b in out.preempted and b.spec_token_ids == [] and b.num_computed_tokens == 0
    assert out.scheduled == [(a, 4)]
