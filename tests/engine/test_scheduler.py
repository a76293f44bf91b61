"""Scheduler: the token budget, chunked prefill, FCFS/priority, preemption by recompute, abort — exact page ids."""
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from ie_jax.sampling import SamplingParams


def make(num_pages=16, page_size=4, budget=8, seats=4, prefix=True):
    cfg = EngineConfig(max_model_len=min(64, num_pages * page_size), max_num_seqs=seats, max_num_batched_tokens=budget, page_size=page_size,
                       num_pages=num_pages, enable_prefix_caching=prefix)
    return Scheduler(cfg, BlockManager(num_pages, page_size, prefix))


def req(rid, n, priority=0, t=0.0):
    return Request(rid, list(range(100, 100 + n)), SamplingParams(), seed=0, priority=priority, arrival_time=t)


def step(s, sample=True):
    """schedule + update; requests that reached their end get one new token."""
    out = s.schedule()
    s.update(out)
    for r, _ in out.scheduled:
        if sample and r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(7)
    return [(r.request_id, n) for r, n in out.scheduled], [r.request_id for r in out.preempted]


def test_chunked_prefill_shares_budget_with_decodes():
    s = make(budget=8)
    s.add(req("a", 5, t=0))
    s.add(req("b", 10, t=1))
    assert step(s) == ([("a", 5), ("b", 3)], [])  # b's prompt is cut to the budget left
    assert step(s) == ([("a", 1), ("b", 7)], [])  # a decodes, b's prompt finishes
    assert step(s) == ([("a", 1), ("b", 1)], [])
    a, b = s.running
    assert a.page_ids == [0, 1] and b.page_ids == [2, 3, 4]


def test_seats_limit_and_fcfs_no_jumping():
    s = make(budget=64, seats=2)
    for i, n in enumerate([3, 3, 3]):
        s.add(req(f"r{i}", n, t=i))
    assert step(s)[0] == [("r0", 3), ("r1", 3)]
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_priority_orders_waiting_requests():
    s = make(budget=64, seats=2)
    s.add(req("low", 3, priority=5, t=0))
    s.add(req("high", 3, priority=0, t=1))
    s.add(req("mid", 3, priority=1, t=2))
    assert step(s)[0] == [("high", 3), ("mid", 3)]


def test_preemption_frees_newest_and_recomputes_with_outputs():
    s = make(num_pages=4, page_size=4, budget=16)
    s.add(req("a", 8, t=0))
    s.add(req("b", 7, t=1))
    assert step(s) == ([("a", 8), ("b", 7)], [])  # 2 + 2 pages: the pool is full
    a, b = s.running
    assert (a.page_ids, b.page_ids) == ([0, 1], [2, 3])
    # a needs a third page for its 9th token: b (newest) is preempted and its pages go to a.
    assert step(s) == ([("a", 1)], ["b"])
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.page_ids == []
    assert a.page_ids == [0, 1, 3]
    assert b.output_token_ids == [7]  # kept: recomputed as part of the prompt later
    s.finish(a, RequestStatus.FINISHED_LENGTH)
    sched, _ = step(s)
    # b recomputes its 7 prompt tokens + 1 earlier output, minus its first page: both prompts start with the same
    # 4 tokens, so a's page 0 (idle but still cached) serves it.
    assert sched == [("b", 4)]
    assert b.page_ids[0] == 0 and b.num_cached_tokens == 0 and s.block_manager.num_free_pages == 4 - 2


def test_abort_frees_pages_and_nothing_leaks():
    s = make(num_pages=8, budget=8)
    s.add(req("a", 6, t=0))
    s.add(req("b", 6, t=1))
    step(s)
    s.abort("b")
    s.abort("missing")
    assert s.requests.keys() == {"a"}
    for _ in range(3):
        step(s)
    s.finish(s.running[0], RequestStatus.FINISHED_STOPPED)
    assert not s.has_unfinished and s.block_manager.num_free_pages == 8


def test_prefix_cache_hit_skips_computed_pages():
    s = make(num_pages=16, page_size=4, budget=32)
    shared = list(range(1, 13))
    s.add(Request("a", shared + [50], SamplingParams(), seed=0, arrival_time=0))
    step(s)
    s.add(Request("b", shared + [60, 61], SamplingParams(), seed=0, arrival_time=1))
    sched, _ = step(s)
    assert sched == [("a", 1), ("b", 2)]  # b computes only its 2 new tokens; 12 came from the cache
    b = s.running[1]
    assert b.num_cached_tokens == 12 and b.page_ids[:3] == s.running[0].page_ids[:3]
