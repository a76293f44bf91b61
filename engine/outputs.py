"""What the engine hands back to its front ends: one `RequestOutput` per request per step that produced tokens.

Outputs are deltas (the tokens, text and logprobs new since the last output), plus running totals; the offline
`LLM` front end concatenates them, the server streams them.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict[int, float]] | None  # per new token: {token_id: logprob}, sampled token included
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # SamplingParams.prompt_logprobs, in the request's first output only: per prompt token None (the first) or
    # {token_id: logprob}
    prompt_logprobs: list[dict[int, float] | None] | None = None


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one: what a consumer that fell behind reads instead of both."""
    logprobs = None
    if first.new_logprobs is not None or later.new_logprobs is not None:
        logprobs = (first.new_logprobs or []) + (later.new_logprobs or [])
    return dataclasses.replace(later, new_token_ids=first.new_token_ids + later.new_token_ids,
                               new_text=first.new_text + later.new_text, new_logprobs=logprobs,
                               prompt_logprobs=first.prompt_logprobs or later.prompt_logprobs)
