"""The engine's host bookkeeping alone (no jax): page allocation and reference counts,
prefix-cache hits and LRU eviction, and the scheduler's budget, admission, chunking and
preemption rules."""

import pytest

from jaxaccel.engine.page_pool import PagePool, pages_for_budget, pages_needed
from jaxaccel.engine.prefix_cache import PrefixCache
from jaxaccel.engine.requests import Request, SamplingParams
from jaxaccel.engine.scheduler import Scheduler
from jaxaccel.errors import UsageError


def test_pool_hands_out_pages_once_and_never_the_null_page():
    pool = PagePool(5)
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and pool.allocate(1) is None
    pool.release(pages[:2])
    assert pool.free_count == 2 and pool.used_count == 2
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([pages[0]])


def test_pool_sizes():
    assert pages_needed(9, 4) == 3 and pages_needed(8, 4) == 2
    assert pages_for_budget(1000, 100) == 10
    with pytest.raises(UsageError, match="at least 2"):
        pages_for_budget(150, 100)


def test_prefix_cache_shares_full_pages_of_equal_prefixes_only():
    pool = PagePool(10)
    cache = PrefixCache(pool, page_size=2)
    tokens = [1, 2, 3, 4, 5]
    pages = pool.allocate(3)
    cache.register([], tokens, pages, 0, 2)  # two full pages
    keys = []
    assert cache.lookup(keys, [1, 2, 3, 4, 9], 2) == pages[:2]
    assert pool.refs[pages[0]] == 2
    assert cache.lookup([], [1, 2, 7, 4], 2) == pages[:1]  # the chain breaks at page 2
    assert cache.lookup([], [9, 2, 3, 4], 2) == []  # same page 2, other prefix: no hit


def test_freed_cached_pages_are_revived_or_evicted_least_recent_first():
    pool = PagePool(4)  # pages 1..3
    cache = PrefixCache(pool, page_size=1)
    a, b = pool.allocate(1), pool.allocate(1)
    cache.register([], [10], a, 0, 1)
    cache.register([], [20], b, 0, 1)
    pool.release(a)
    pool.release(b)
    assert cache.lookup([], [20], 1) == b  # revived from the free queue
    pool.allocate(1)  # the never-used page 3 goes first
    pool.allocate(1)  # then a's page, least recently freed: its prefix is evicted
    assert cache.lookup([], [10], 1) == []


def make(pages=20, page_size=4, seqs=4, budget=32, prefix=True, window=None):
    pool = PagePool(pages)
    return Scheduler(pool, PrefixCache(pool, page_size, prefix), page_size, seqs, budget,
                     window)


def req(i, n, new=4):
    return Request(i, list(range(1, n + 1)), SamplingParams(max_tokens=new))


def test_budget_chunks_prompts_and_limits_sequences():
    sched = make(budget=10, seqs=2, prefix=False)  # equal prompt heads: no waiting for them
    for i, n in enumerate((7, 6, 3)):
        sched.add(req(i, n))
    rows = sched.schedule()
    assert [(r.seq.request.request_id, r.start, r.count) for r in rows] == [(0, 0, 7), (1, 0, 3)]
    sched.advance(rows)
    assert [r.samples for r in rows] == [True, False]
    rows[0].seq.tokens.append(5)  # the engine appends the sampled token
    rows = sched.schedule()  # the decode first, then the rest of the chunked prompt
    assert [(r.seq.request.request_id, r.start, r.count) for r in rows] == [(0, 7, 1), (1, 3, 3)]
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def test_out_of_pages_preempts_the_newest_and_recomputes_it():
    sched = make(pages=5, page_size=4, budget=64, prefix=False)  # 4 usable pages
    sched.add(req(0, 8))
    sched.add(req(1, 8))
    rows = sched.schedule()
    sched.advance(rows)
    for r in rows:
        r.seq.tokens.append(7)
    rows = sched.schedule()  # both need a third page: the newest (1) yields to 0
    assert [r.seq.request.request_id for r in rows] == [0]
    assert sched.preemptions == 1 and sched.waiting[0].request.request_id == 1
    assert sched.waiting[0].computed == 0 and sched.waiting[0].tokens[-1] == 7
    sched.advance(rows)
    sched.finish(rows[0].seq)
    rows = sched.schedule()  # recomputed from its prompt and its token so far
    assert [(r.seq.request.request_id, r.start, r.count) for r in rows] == [(1, 0, 9)]


def test_a_cached_prefix_is_not_recomputed():
    sched = make(page_size=4)
    sched.add(req(0, 10))
    rows = sched.schedule()
    sched.advance(rows)
    sched.add(req(1, 10))  # same prompt: two full pages cached, the last token computed
    first = rows[0].seq
    [row] = sched.schedule()  # the first waits for its sampled token: not scheduled
    assert (row.seq.request.request_id, row.start, row.count) == (1, 8, 2)
    assert row.seq.pages[:2] == first.pages[:2] and row.seq.pages[2] != first.pages[2]


def test_requests_arriving_together_compute_a_shared_prefix_once():
    sched = make(pages=40, page_size=4, seqs=8, budget=64)
    prefix = list(range(1, 13))  # three full pages
    for i in range(4):
        sched.add(Request(i, prefix + [50 + i, 60 + i], SamplingParams(max_tokens=2)))
    rows = sched.schedule()  # the others wait while the first computes the shared pages
    assert [(r.seq.request.request_id, r.start, r.count) for r in rows] == [(0, 0, 14)]
    sched.advance(rows)
    rows[0].seq.tokens.append(7)
    rows = sched.schedule()
    assert [(r.seq.request.request_id, r.start, r.count) for r in rows] == [
        (0, 14, 1), (1, 12, 2), (2, 12, 2), (3, 12, 2)]
    sched.advance(rows)
    assert sched.prefill_tokens == 14 + 3 * 2


def test_abort_frees_a_running_or_waiting_request_at_once():
    sched = make(pages=9, page_size=4, budget=64, seqs=1, prefix=False)
    sched.add(req(0, 9))
    sched.add(req(1, 5))
    sched.advance(sched.schedule())
    assert sched.pool.used_count == 3 and len(sched.waiting) == 1
    assert sched.abort(0) and sched.pool.used_count == 0 and not sched.running
    assert sched.abort(1) and not sched.has_work
    assert not sched.abort(1)  # gone already


def test_a_windowed_sequence_frees_pages_behind_its_window_and_keeps_shared_ones():
    """Window 6, pages of 4: a query at position q reads positions q-5..q, so after 10
    tokens (next query 10: positions 5..) page 0 (0..3) is dead and page 1 (4..7) is not.
    A page the prefix cache or another sequence holds only loses a reference."""
    sched = make(pages=20, page_size=4, window=6)
    sched.add(req(0, 10, new=40))
    [row] = sched.schedule()
    first = row.seq
    page0, page1 = first.pages[:2]
    sched.advance([row])
    assert sched.pool.refs[page0] == 0 and sched.pool.refs[page1] == 1
    assert sched.pool.used_count == 2  # pages 1 and 2 of the sequence
    sched.add(req(1, 10, new=40))  # same prompt: pages 0 and 1 found in the prefix cache
    first.tokens.append(7)
    rows = sched.schedule()
    assert [(r.seq.request.request_id, r.start, r.count) for r in rows] == [(0, 10, 1), (1, 8, 2)]
    second = rows[1].seq
    assert second.pages[:2] == [page0, page1]  # page 0 revived from the free queue
    sched.advance(rows)
    assert sched.pool.refs[page0] == 0 and sched.pool.refs[page1] == 2
    held = []
    for _ in range(30):  # decode both far past the window
        for seq in sched.running:
            seq.tokens.append(7)
        rows = sched.schedule()  # each row's query q: pages for positions q-5..q at most
        held.append(max(len(r.seq.pages) - r.seq.pages.count(0) for r in rows))
        sched.advance(rows)
    assert max(held) == 3  # ceil(6 / 4) + 1
    assert sched.pool.refs[page1] == 0
    for seq in list(sched.running):
        sched.finish(seq)
    assert sched.pool.used_count == 0 and sched.pool.free_count == 19
