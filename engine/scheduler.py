"""The scheduler: which requests run this step and how many tokens each computes. Plain Python, no jax.

There is no separate prefill phase: every running request advances `num_computed_tokens` toward `num_tokens`,
a decode by one token, a prompt by a chunk, all from one token budget per step.
"""
from __future__ import annotations

import dataclasses
import functools

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.lora import AdapterSlots
from engine.request import Request, RequestStatus


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]]  # (request, tokens to compute this step), in row order
    preempted: list[Request]

    @functools.cached_property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Request] = []  # kept sorted by (priority, arrival)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.adapter_slots = AdapterSlots(config.max_loras) if config.enable_lora else None

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id={request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        i = len(self.waiting)
        while i and self.waiting[i - 1].sort_key > request.sort_key:
            i -= 1
        self.waiting.insert(i, request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Rule, in order:
        1. Running requests, oldest first, each take min(tokens left, budget left). When pages run out, the
           running request that sorts last (lowest priority, then newest) is preempted: its pages are freed and
           it waits to be recomputed from scratch (its outputs so far become part of what it recomputes), until
           the current request fits or is itself the one preempted.
        2. Then waiting requests by (priority, arrival), while budget, seats (max_num_seqs) and pages last. A
           new request first takes its cached prefix pages; its prompt may be cut into chunks over several steps.
        Nothing waiting jumps a request that did not fit (FCFS), so a long prompt cannot starve. The one exception
        (vLLM's): a request whose LoRA adapter finds no slot (every slot is held by other adapters' running
        requests) is passed over, keeping its place, for those behind it.
        """
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._done_pending(request) or (request.guide is not None and self._guide_pending(request)):
                i += 1  # its last token, still in flight, ends it or decides its next mask: wait for it
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not bm.allocate(request, n):
                victim = max(self.running, key=lambda r: r.sort_key)
                was_scheduled = self.running.index(victim) < i
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
                if was_scheduled:  # it already took tokens this step: give them back
                    k = next(j for j, (r, _) in enumerate(scheduled) if r is victim)
                    budget += scheduled.pop(k)[1]
                    i -= 1
            else:
                scheduled.append((request, n))
                budget -= n
                i += 1
                continue
            # `request` itself was preempted: the list shrank at position i, so do not advance.

        if not preempted:  # a step that had to preempt admits nobody new
            passed = []  # requests whose adapter has no slot this step: they keep their place in the queue
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                request = self.waiting[0]
                if request.lora_name is not None and not self._seat_adapter(request):
                    passed.append(self.waiting.pop(0))
                    continue
                hits = bm.find_cached_prefix(request)
                computed = len(hits) * bm.page_size
                n = min(request.num_tokens - computed, budget)
                if not bm.allocate(request, n, hits):
                    self._unseat_adapter(request)
                    break
                request.num_computed_tokens = computed
                if not request.output_token_ids and not request.num_preemptions:
                    request.num_cached_tokens = computed
                self.waiting.pop(0)
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                scheduled.append((request, n))
                budget -= n
            self.waiting[:0] = passed  # they were ahead of every request still waiting
        return SchedulerOutput(scheduled, preempted)

    def _seat_adapter(self, request: Request) -> bool:
        slot = self.adapter_slots.acquire(request.lora_name)
        request.lora_slot = -1 if slot is None else slot
        return slot is not None

    def _unseat_adapter(self, request: Request) -> None:
        if request.lora_slot >= 0:
            self.adapter_slots.release(request.lora_slot)
            request.lora_slot = -1

    @staticmethod
    def _guide_pending(request: Request) -> bool:  # request.guide is set
        """A guided request's next allowed tokens depend on its newest token: it sits out the steps where that
        token is still on the device (LLMEngine.step reads the step back first where such requests are at least
        half of the running ones, so there it advances every step)."""
        outputs = request.output_token_ids
        return not request.guide.static and bool(outputs) and outputs[-1] < 0

    def _done_pending(self, request: Request) -> bool:
        return bool(request.output_token_ids) and (len(request.output_token_ids) >= request.sampling_params.max_tokens
                                                   or request.num_tokens >= self.config.max_model_len)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free_request(request)
        self._unseat_adapter(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def update(self, out: SchedulerOutput) -> None:
        """Account for a finished step: the scheduled tokens are now in the cache."""
        for request, n in out.scheduled:
            request.num_computed_tokens += n
            self.block_manager.cache_full_pages(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a request (stopped, length, or aborted) and free its pages."""
        assert status.finished
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free_request(request)
        self._unseat_adapter(request)
        request.status = status
        self.requests.pop(request.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request
