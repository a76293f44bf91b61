"""KV pages: the free list, reference counts and the prefix cache. Plain Python; the device never sees this.

    request.page_ids      [ 7 | 2 | 9 | 4 ]       page i holds the K/V of tokens [i*P, (i+1)*P)
                           full full full partial
    request.page_hashes   [h0, h1, h2]            h_i = hash((h_{i-1}, tokens of page i, adapter))
    cached                {h: page}               full pages whose K/V are known, shareable by any request
    free (LRU queue)      head ... tail           ref_count == 0 pages; new pages come from the head, freed pages
                                                  join the tail, so the least recently used cached page goes first

A page found in `cached` is reused by bumping its ref count (and leaving the free queue if it was idle).
Allocating a free page that still carries a hash evicts that hash. After every request finishes or is aborted,
every page is back in the free queue: `num_free_pages == num_pages` is the no-leak invariant tests check.
"""
from __future__ import annotations

from collections import OrderedDict

from engine.request import Request


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1:
            raise ValueError(f"{num_pages=} must be >= 1")
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.page_hash: list[int | None] = [None] * num_pages
        self.cached: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free_pages(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_pages

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _update_hashes(self, request: Request) -> None:
        """Extend request.page_hashes over every full page of its known tokens. The hash includes the request's
        LoRA adapter: the same tokens under another adapter have other K/V."""
        P, n = self.page_size, request.num_tokens
        pending = n and request.token_ids_slice(n - 1, n)[0] < 0  # a token still on the device is not hashed
        for i in range(len(request.page_hashes), (n - pending) // P):
            parent = request.page_hashes[-1] if request.page_hashes else None
            page_tokens = tuple(request.token_ids_slice(i * P, (i + 1) * P))
            request.page_hashes.append(hash((parent, page_tokens, request.lora_name)))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Pages holding the longest cached prefix of a new request. At least one token is left to compute,
        since the step must produce logits for the last one."""
        if not self.enable_prefix_caching or request.num_computed_tokens:
            return []
        self._update_hashes(request)
        hits = []
        for h in request.page_hashes[: (request.num_tokens - 1) // self.page_size]:
            page = self.cached.get(h)
            if page is None:
                break
            hits.append(page)
        self.prefix_queries += request.num_prompt_tokens
        self.prefix_hits += len(hits) * self.page_size
        return hits

    def allocate(self, request: Request, num_new_tokens: int, cached_pages: list[int] = ()) -> bool:
        """Give `request` the pages for `num_new_tokens` more tokens (after taking `cached_pages` as its first
        pages). Returns False, changing nothing, when the free pages do not suffice."""
        total = request.num_computed_tokens + len(cached_pages) * self.page_size + num_new_tokens
        if total <= len(request.page_ids) * self.page_size and not cached_pages:
            return True  # its last page has room (most decode steps)
        num_new_pages = self.pages_needed(total) - len(request.page_ids) - len(cached_pages)
        idle_hits = sum(1 for p in cached_pages if self.ref_counts[p] == 0)
        if num_new_pages + idle_hits > len(self.free):
            return False
        for page in cached_pages:
            if self.ref_counts[page] == 0:
                del self.free[page]
            self.ref_counts[page] += 1
            request.page_ids.append(page)
        for _ in range(max(0, num_new_pages)):
            page, _ = self.free.popitem(last=False)
            if self.page_hash[page] is not None:  # evict the LRU cached page's content
                del self.cached[self.page_hash[page]]
                self.page_hash[page] = None
            self.ref_counts[page] = 1
            request.page_ids.append(page)
        return True

    def cache_full_pages(self, request: Request) -> None:
        """Publish the request's full, computed pages in the prefix cache."""
        if not self.enable_prefix_caching or request.num_computed_tokens // self.page_size <= \
                request.num_published_pages:
            return  # no page has filled since the last call (most decode steps)
        self._update_hashes(request)
        full = min(request.num_computed_tokens // self.page_size, len(request.page_hashes))
        for i in range(request.num_published_pages, full):  # pages before it were published (or taken) already
            page, h = request.page_ids[i], request.page_hashes[i]
            if self.page_hash[page] is None and h not in self.cached:
                self.cached[h] = page
                self.page_hash[page] = h
        request.num_published_pages = full  # computed tokens only grow (preemption resets it in free_request)

    def free_request(self, request: Request) -> None:
        """Drop the request's references; idle pages join the free queue, its last page first to go."""
        for page in reversed(request.page_ids):
            self.ref_counts[page] -= 1
            assert self.ref_counts[page] >= 0, f"page {page} freed twice"
            if self.ref_counts[page] == 0:
                self.free[page] = None
        request.page_ids = []
        request.num_published_pages = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached page's content (vLLM's reset_prefix_cache: after the weights change, or to measure
        without hits). Only while no request holds a page; returns False, changing nothing, otherwise."""
        if any(self.ref_counts):
            return False
        self.cached.clear()
        self.page_hash = [None] * self.num_pages
        self.prefix_queries = self.prefix_hits = 0
        return True
