"""Per-request state, in plain Python (no jax). The scheduler advances `num_computed_tokens` toward `num_tokens`;
the block manager owns `page_ids`; the engine appends sampled tokens and decides when a request is finished."""
from __future__ import annotations

import dataclasses
import enum
import time

from ie_jax.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self is not WAITING and self is not RUNNING


WAITING, RUNNING = RequestStatus.WAITING, RequestStatus.RUNNING
FINISHED_STOPPED, FINISHED_LENGTH = RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int  # resolved per request, so sampling does not depend on the batch (or on preemption)
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0  # lower runs first (vLLM's convention); ties by arrival
    variant: str = "full"  # the cheapest step sampler that serves this request (engine/variants.py)
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of the prompt, served by the prefix cache at first schedule
    page_ids: list[int] = dataclasses.field(default_factory=list)
    page_hashes: list[int] = dataclasses.field(default_factory=list)  # chained hashes of its full pages so far
    num_published_pages: int = 0  # its first pages already offered to the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    lora_name: str | None = None  # the LoRA adapter it runs with (engine/lora.py); None = the base model
    lora_slot: int = -1  # the device slot holding that adapter while the request runs
    guide: object = None  # guided decoding: its ie_jax.guided.TokenGuide, and the state of the text so far
    guide_state: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building the whole list (a decode step reads one token)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p: stop - p]
        return self.prompt_token_ids[start:stop] + self.output_token_ids[:max(stop - p, 0)]

    @property
    def is_finished(self) -> bool:
        return self.status is not WAITING and self.status is not RUNNING  # by identity: no enum hashing

    @property
    def sort_key(self) -> tuple[int, float]:
        return (self.priority, self.arrival_time)
