"""Stop rules shared by the reference generate and the engine (vLLM semantics).

After each sampled token the caller appends the token's new text, then asks `check_stop`. A request ends on
  EOS (unless ignore_eos) or one of stop_token_ids   -> "stop"; the token stays in token_ids, its text is dropped
  a stop string in the text                           -> "stop"; text cut before it (or after, with
                                                         include_stop_str_in_output)
  max_tokens, or the model length                     -> "length"
EOS, stop ids and stop strings count only once min_tokens tokens exist. Stop strings are searched only in the tail
that the last token could have completed, so the check is O(len(stop)) per token, not O(len(text)).
"""
from __future__ import annotations

import dataclasses

from ie_jax.sampling import SamplingParams


@dataclasses.dataclass
class StopResult:
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None
    text: str  # the output text, cut as the rule says


def check_stop(p: SamplingParams, token_id: int, num_generated: int, eos_ids, text: str, num_new_chars: int,
               at_max_len: bool = False) -> StopResult | None:
    if num_generated >= p.min_tokens:
        if not p.ignore_eos and token_id in eos_ids:
            return StopResult("stop", None, text[: len(text) - num_new_chars])
        if token_id in p.stop_token_ids:
            keep = text if p.include_stop_str_in_output else text[: len(text) - num_new_chars]
            return StopResult("stop", token_id, keep)
        if p.stop and num_new_chars:
            tail_start = max(0, len(text) - num_new_chars - max(map(len, p.stop)) + 1)
            for s in p.stop:
                at = text.find(s, tail_start)
                if at >= 0:
                    return StopResult("stop", s, text[: at + (len(s) if p.include_stop_str_in_output else 0)])
    if num_generated >= p.max_tokens or at_max_len:
        return StopResult("length", None, text)
    return None
