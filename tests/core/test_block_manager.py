from tokenmill.core.block_manager import BlockManager
from tokenmill.core.sequence import Sequence
from tokenmill.sampling_params import SamplingParams


def seq(tokens, **kw):
    return Sequence("r", list(tokens), SamplingParams(**kw))


def computed(bm, s, n):
    """Allocate and mark n more tokens computed (what a scheduler step + update does)."""
    assert bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)


def test_allocation_takes_lowest_free_ids_and_frees_tail_first():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(10))
    computed(bm, a, 10)
    assert a.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5
    bm.free_seq(a)
    # freed in reverse: the tail page is the first to be reused after the never-used ones
    assert list(bm.free) == [3, 4, 5, 6, 7, 2, 1, 0]


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(10))
    computed(bm, a, 10)
    b = seq(list(range(8)) + [99, 98])
    assert bm.allocate(b, 10)
    assert b.block_table[:2] == [0, 1] and b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.blocks[0].ref_count == 2
    assert b.block_table[2] == 3          # its own page for tokens 8..9
    # a prompt that is entirely cached still computes its last token
    c = seq(range(8))
    assert bm.allocate(c, 8)
    assert c.num_computed_tokens == 4 and c.block_table[0] == 0
    assert bm.stats.queries == 10 + 10 + 8 and bm.stats.hits == 8 + 4


def test_hash_chain_depends_on_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    computed(bm, a, 9)
    b = seq([0, 2, 3, 4, 5, 6, 7, 8, 9])   # second block equal, first differs: no hit at all
    assert bm.allocate(b, 9)
    assert b.num_computed_tokens == 0 and b.block_table == [3, 4, 5]


def test_freed_cached_blocks_are_hit_then_evicted_in_lru_order():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    computed(bm, a, 5)                     # pages 0,1 full and hashed, page 2 partial
    bm.free_seq(a)                         # free order: 3, 2, 1, 0
    b = seq([1, 2, 3, 4, 7])
    assert bm.allocate(b, 5)               # hits pages 0 and 1, takes page 3 (least recently freed)
    assert b.block_table == [0, 1, 3]
    bm.free_seq(b)                         # free order: 2, 3, 1, 0
    c = seq([9, 9, 9, 9, 9, 9, 9])
    assert bm.allocate(c, 7)               # no hit; evicts 2, 3, 1, 0 in order
    assert c.block_table == [2, 3, 1, 0]
    assert bm.cached == {}
    d = seq([1, 2, 3, 4, 5])
    assert not bm.allocate(d, 5)           # pool exhausted: no change
    assert d.block_table == [] and d.num_computed_tokens == 0


def test_fork_shares_pages_and_copy_on_write_on_the_partial_page():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = seq(range(6))
    computed(bm, parent, 6)
    child = parent.fork(1)
    bm.fork(parent, child)
    assert child.block_table == [0, 1] and bm.blocks[1].ref_count == 2
    child.token_ids.append(50)
    assert bm.allocate(child, 1)           # writes position 6 into shared page 1: copy it first
    assert child.block_table == [0, 2]
    assert bm.take_copies() == [(1, 2)]
    assert bm.blocks[1].ref_count == 1 and bm.blocks[0].ref_count == 2
    parent.token_ids.append(60)
    assert bm.allocate(parent, 1)          # now the sole owner: writes in place
    assert parent.block_table == [0, 1] and bm.take_copies() == []


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(range(9))
    computed(bm, a, 9)
    b = seq(range(9))
    assert bm.allocate(b, 9)
    assert b.num_computed_tokens == 0 and b.block_table == [3, 4, 5]


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    computed(bm, seq(range(9)), 9)
    b = seq(range(9), prompt_logprobs=1)
    assert bm.allocate(b, 9)
    assert b.num_computed_tokens == 0


# ---- KV groups with a sliding window -------------------------------------------------------------
def windowed(num_blocks=16):
    """Group 0 full attention, group 1 a window of 8 tokens, 4-token pages, one pool."""
    return BlockManager(num_blocks=num_blocks, block_size=4, enable_prefix_caching=False, windows=(None, 8))


def test_windowed_group_releases_pages_its_window_left():
    bm = windowed()
    s = seq(range(10))
    computed(bm, s, 10)
    assert s.block_tables == [[0, 1, 2], [3, 4, 5]]
    s.token_ids.append(7)
    computed(bm, s, 1)                      # position 10 sees 3..10: page 0 (0..3) still live
    assert s.block_tables == [[0, 1, 2], [3, 4, 5]]
    s.token_ids.append(7)
    computed(bm, s, 1)                      # position 11 sees 4..11: page 0 goes back to the pool
    assert s.block_tables == [[0, 1, 2], [-1, 4, 5]] and list(bm.free)[-1] == 3
    s.token_ids.append(7)
    computed(bm, s, 1)                      # position 12: a new page in each group
    assert s.block_tables == [[0, 1, 2, 6], [-1, 4, 5, 7]] and bm.num_free_blocks == 16 - 7
    for _ in range(8):                      # position 20 sees 13..20: pages 1, 2 out as well
        s.token_ids.append(7)
        computed(bm, s, 1)
    assert s.block_tables[1][:3] == [-1, -1, -1] and len([b for b in s.block_tables[1] if b >= 0]) == 3
    assert bm.writable_slots(s, 20) == 4        # positions 20..23 of the last pages
    bm.free_seq(s)
    assert s.block_tables == [[], []] and bm.num_free_blocks == 16


def test_windowed_fork_and_copy_on_write_in_every_group():
    bm = windowed()
    parent = seq(range(14))
    computed(bm, parent, 14)                # pages go when a later step's first token cannot see them
    assert parent.block_tables == [[0, 1, 2, 3], [4, 5, 6, 7]]
    child = parent.fork(1)
    bm.fork(parent, child)
    assert child.block_tables == parent.block_tables and bm.blocks[7].ref_count == 2
    child.token_ids.append(50)
    assert bm.allocate(child, 1)            # position 14 sees 7..14: the child lets page 4 go, and
    assert child.block_tables == [[0, 1, 2, 8], [-1, 5, 6, 9]]     # copies shared pages 3 and 7
    assert bm.take_copies() == [(3, 8), (7, 9)] and bm.blocks[4].ref_count == 1
    bm.free_seq(parent)
    bm.free_seq(child)
    assert bm.num_free_blocks == 16 and all(b.ref_count == 0 for b in bm.blocks)


def test_windowed_allocation_counts_every_group_and_fails_whole():
    bm = windowed(num_blocks=5)
    s = seq(range(12))
    assert not bm.allocate(s, 12)           # 3 + 3 pages > 5: nothing taken
    assert s.block_tables == [[], []] and bm.num_free_blocks == 5
    assert bm.allocate(s, 8)                # 2 + 2
    assert bm.pages_for(12, chunk=8) == 3 + 3 and bm.pages_for(100, chunk=1) == 25 + 3
    assert bm.max_tokens(chunk=1, limit=1000) == 8           # 2 + 2 pages; 9 tokens need 3 + 3
    assert windowed(num_blocks=40).max_tokens(chunk=1, limit=1000) == (40 - 3) * 4
    assert BlockManager(4, 4, windows=(8,), enable_prefix_caching=False).max_tokens(chunk=1, limit=1000) == 1000


def test_prefix_caching_needs_a_single_full_group():
    import pytest
    with pytest.raises(ValueError, match="prefix caching"):
        BlockManager(num_blocks=4, block_size=4, windows=(None, 8))
