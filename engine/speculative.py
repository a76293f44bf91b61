"""Speculative decoding by prompt lookup (vLLM's `--speculative-config '{"method": "ngram", ...}'`).

A request's last few tokens are looked up earlier in its own text (prompt and output); the tokens that followed
that occurrence are its draft. One step then checks the draft: the request's newest token and its d draft tokens
run as d + 1 one-token rows of the same sequence (`DraftRow`, positions p .. p + d, one KV slot each). Every row
writes its K/V before any row attends, so row j sees the draft tokens before it, and what it samples is the
model's next token after them. Drafts are accepted while they equal the token the row before sampled; the step
yields the accepted drafts plus one more token, 1 to d + 1 tokens for one pass over the weights. The KV written
for rejected drafts lies past the sequence's length and is overwritten later.

Greedy or sampled, the tokens are plain decoding's: each row samples with its request's seed at its own output
position, as it would without speculation. For a fixed draft token x, accepting when the row's own sample equals x
is rejection sampling exactly (x is kept with probability p(x); otherwise the sample is distributed as p without
x), so a seeded request gets the same text either way. Rows with logprobs, penalties (their counts would need the
drafts) or a grammar (its state) do not speculate. The engine runs synchronously while speculating (each step's
tokens reach the host before the next is built), and a step's rows stay within max_num_seqs, so drafts take only
seats no request holds.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # the most draft tokens a request checks in a step
    prompt_lookup_max: int = 4  # the longest suffix n-gram looked up (tried first)
    prompt_lookup_min: int = 1  # the shortest

    def __post_init__(self):
        if self.method not in ("ngram", "[ngram]"):
            raise ValueError(f"speculative method {self.method!r} is not supported: only 'ngram' (prompt lookup); "
                             f"draft models, EAGLE and MTP need a second model")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens} must be >= 1")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} and prompt_lookup_max="
                             f"{self.prompt_lookup_max} must satisfy 1 <= min <= max")

    @classmethod
    def parse(cls, spec) -> SpeculativeConfig | None:
        """From a dict or its JSON text (vLLM's keys); None stays None. Unknown keys are errors."""
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            spec = json.loads(spec)
        if not isinstance(spec, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {spec!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"speculative_config keys {unknown} are not supported; known: {sorted(known)}")
        return cls(**spec)


def propose(tokens, k: int, n_max: int, n_min: int) -> list[int]:
    """Prompt lookup: find the text's last n tokens (the largest n from n_max down to n_min that recurs) at an
    earlier place, the latest one, and return up to k tokens that followed it there ([] if none recurs). Linear in
    the text: only the places where its last token recurs are extended backwards."""
    arr = np.asarray(tokens)
    L = len(arr)
    ends = np.flatnonzero(arr[:L - 1] == arr[L - 1]) if L > 1 else np.zeros(0, np.int64)
    if not ends.size:
        return []
    length, alive = np.ones(ends.size, np.int64), np.ones(ends.size, bool)
    for j in range(1, min(n_max, L - 1)):  # does the match reach j tokens further back?
        alive &= (ends >= j) & (arr[np.maximum(ends - j, 0)] == arr[L - 1 - j])
        length += alive
    best = int(length.max())
    if best < n_min:
        return []
    end = int(ends[np.flatnonzero(length == best)[-1]])  # the latest of the longest
    return arr[end + 1:end + 1 + k].tolist()


class History:
    """A request's tokens (prompt, then outputs) in a growing numpy buffer, so that a lookup each step does not
    convert the whole text again."""

    def __init__(self):
        self.buf, self.n = np.zeros(256, np.int64), 0

    def tokens(self, prompt: list[int], outputs: list[int]) -> np.ndarray:
        total = len(prompt) + len(outputs)
        if total > len(self.buf):
            self.buf = np.concatenate([self.buf, np.zeros(max(total, 2 * len(self.buf)), np.int64)])
        if self.n < len(prompt):
            self.buf[:len(prompt)] = prompt
            self.n = len(prompt)
        self.buf[self.n:total] = outputs[self.n - len(prompt):]
        self.n = total
        return self.buf[:total]


class DraftRow:
    """Row j (j >= 1) of a speculating request, as the runner's `prepare` reads a decode row: the same slot and
    pages, j more computed tokens, and draft token j - 1 as its newest token."""
    __slots__ = ("request_id", "page_ids", "num_computed_tokens", "output_token_ids", "prompt_token_ids", "guide")

    def __init__(self, request, drafts: list[int]):
        self.request_id, self.page_ids, self.guide = request.request_id, request.page_ids, None
        self.prompt_token_ids = request.prompt_token_ids
        self.output_token_ids = request.output_token_ids + drafts
        self.num_computed_tokens = request.num_computed_tokens + len(drafts)


def accepted(drafts: list[int], targets: list[int]) -> int:
    """How many drafts the model agrees with: draft j stands while it equals the argmax after draft j - 1."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return a
