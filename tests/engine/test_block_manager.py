"""Block manager: exact page ids, prefix-cache hits, LRU eviction order, and no leaks."""
import pytest

from engine.block_manager import BlockManager
from engine.request import Request
from ie_jax.sampling import SamplingParams


def req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(), seed=0)


def test_allocate_takes_free_pages_in_order_and_free_returns_them_reversed():
    bm = BlockManager(num_pages=8, page_size=4)
    a = req("a", range(10))
    assert bm.allocate(a, 10)
    assert a.page_ids == [0, 1, 2]
    b = req("b", range(5))
    assert bm.allocate(b, 5)
    assert b.page_ids == [3, 4]
    assert bm.num_free_pages == 3
    bm.free_request(a)
    # Freed pages join the tail, the request's last page first: the LRU order is now 5 6 7 2 1 0.
    assert list(bm.free) == [5, 6, 7, 2, 1, 0]
    bm.free_request(b)
    assert bm.num_free_pages == 8 and all(c == 0 for c in bm.ref_counts)


def test_allocate_fails_without_changing_anything():
    bm = BlockManager(num_pages=3, page_size=4)
    a = req("a", range(13))
    assert not bm.allocate(a, 13)  # needs 4 pages
    assert a.page_ids == [] and bm.num_free_pages == 3


def test_decode_growth_allocates_one_page_at_a_boundary():
    bm = BlockManager(num_pages=4, page_size=4)
    a = req("a", range(4))
    assert bm.allocate(a, 4) and a.page_ids == [0]
    a.num_computed_tokens = 4
    a.output_token_ids.append(9)
    assert bm.allocate(a, 1) and a.page_ids == [0, 1]
    a.num_computed_tokens = 5
    a.output_token_ids.append(9)
    assert bm.allocate(a, 1) and a.page_ids == [0, 1]  # still room in page 1


def test_prefix_hits_share_pages_and_leave_one_token_to_compute():
    bm = BlockManager(num_pages=10, page_size=4)
    a = req("a", range(12))
    assert bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_pages(a)
    assert len(bm.cached) == 3
    # Same 8-token prefix, different tail: pages 0 and 1 are shared.
    b = req("b", list(range(8)) + [99, 98, 97])
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    assert bm.allocate(b, b.num_tokens - 8, hits)
    assert b.page_ids == [0, 1, 3] and bm.ref_counts[:2] == [2, 2]
    # An identical prompt hits all but its last page: the last token must still be computed.
    c = req("c", range(12))
    assert bm.find_cached_prefix(c) == [0, 1]
    assert bm.prefix_queries == 23 and bm.prefix_hits == 16


def test_cached_free_pages_are_reused_then_evicted_lru():
    bm = BlockManager(num_pages=4, page_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    assert bm.allocate(a, 5) and a.page_ids == [0, 1, 2]
    a.num_computed_tokens = 5
    bm.cache_full_pages(a)
    bm.free_request(a)  # pages 0, 1 stay cached while idle; free order 3 2 1 0
    assert list(bm.free) == [3, 2, 1, 0]
    b = req("b", [1, 2, 3, 4, 7])
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    assert bm.allocate(b, 1, hits) and b.page_ids == [0, 1, 3]
    assert list(bm.free) == [2]
    bm.free_request(b)
    # Now a request with new content takes page 2 first (least recently freed), then 3, then evicts 1's hash.
    c = req("c", [50, 51, 52, 53, 54, 55])
    assert bm.allocate(c, 6) and c.page_ids == [2, 3, 1]
    assert bm.page_hash[1] is None and bm.page_hash[0] is not None
    bm.free_request(c)
    assert bm.num_free_pages == 4


def test_double_free_is_caught():
    bm = BlockManager(num_pages=2, page_size=2)
    a = req("a", [1])
    bm.allocate(a, 1)
    pages = list(a.page_ids)
    bm.free_request(a)
    a.page_ids = pages
    with pytest.raises(AssertionError):
        bm.free_request(a)


def test_reset_prefix_cache_only_when_idle():
    bm = BlockManager(num_pages=6, page_size=4)
    a = req("a", range(12))
    assert bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_pages(a)
    assert len(bm.cached) == 3
    assert not bm.reset_prefix_cache()  # a still holds its pages: nothing changes
    assert len(bm.cached) == 3
    bm.free_request(a)
    assert bm.find_cached_prefix(req("b", range(12))) == [0, 1]  # idle pages still hit
    assert bm.reset_prefix_cache()
    assert bm.cached == {} and bm.page_hash == [None] * 6 and bm.prefix_queries == bm.prefix_hits == 0
    c = req("c", range(12))
    assert bm.find_cached_prefix(c) == []
    assert bm.allocate(c, 12) and bm.num_free_pages == 3  # the pages are plain free pages again
    bm.free_request(c)
    assert bm.num_free_pages == 6
