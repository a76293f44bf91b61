"""Incremental detokenization: turn a stream of generated token ids into a stream of text pieces.

Decoding one token at a time is wrong in two ways. A character can span several tokens (byte-level BPE splits
"中" into three byte tokens; sentencepiece byte fallback spells an emoji as <0xF0><0x9F><0x98><0x80>), so the
text of a lone token may be half a character. And a token's text depends on its left neighbour: sentencepiece
decoders drop the "▁" space of the first token they see. So each step decodes a short window of recent ids twice,

    ids:     ... | prefix_offset ........ read_offset ........ end |
    text:          decode(ids[prefix:read])   (already emitted)
                   decode(ids[prefix:end])    (the same, plus what is new)

and emits the difference. Both decodes start at the same token, so whatever the decoder does at the start of a
window cancels out. While the longer decode ends in U+FFFD (the decoder's mark for an incomplete UTF-8 sequence),
nothing is emitted and the window grows until the character is whole. After each emission the window slides: the
ids just read become the next prefix. The window stays a few tokens long, so a step costs the same at token 10
and at token 10,000.

This module knows only `Tokenizer.decode`. It does not match stop strings or hold text back for them (the engine
does, on `text`), and it does not apply transformers' clean-up of spaces before punctuation.
"""
from __future__ import annotations

from collections.abc import Sequence

from ie_jax.tokenizer import Tokenizer

# Prompt ids kept as left context for the first generated tokens: enough for a decoder's start-of-text rules
# and for a character whose bytes began in the prompt.
PROMPT_CONTEXT_TOKENS = 5

# Most tokens one character can take: 4 UTF-8 bytes, each a byte token in the worst case, twice over for slack.
MAX_CHARACTER_TOKENS = 8

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of one request's generated tokens, released only in whole characters."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = self._prompt_context(prompt_ids)
        # The window is self._ids: [0, read_offset) has been emitted (or is prompt), [read_offset, end) has not.
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode(self._ids[:read_offset]), computed when first needed
        self._chunks: list[str] = []

    def _prompt_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """The last few prompt ids, reaching back to the start of a whole character.

        A window that opens inside a character decodes to U+FFFD there, and byte-fallback decoders then replace
        the whole run of byte tokens, valid ones included; so widen the window until its text starts cleanly.
        """
        start = max(len(prompt_ids) - PROMPT_CONTEXT_TOKENS, 0)
        limit = max(start - MAX_CHARACTER_TOKENS, 0)
        while start > limit and self._decode([int(i) for i in prompt_ids[start:]]).startswith(_REPLACEMENT):
            start -= 1
        return [int(i) for i in prompt_ids[start:]]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_id: int) -> str:
        """Append one generated id and return the text it completes ("" while a character is still partial)."""
        self._ids.append(int(token_id))
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[:self._read_offset])
        full = self._decode(self._ids)
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT):
            return ""
        return self._emit(full)

    def flush(self) -> str:
        """Emit whatever is held back, replacement characters included; call once the request has finished."""
        if self._read_offset == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[:self._read_offset])
        full = self._decode(self._ids)
        return self._emit(full) if len(full) > len(self._prefix_text) else ""

    def _emit(self, full: str) -> str:
        new_text = full[len(self._prefix_text):]
        # Slide the window: the ids just read become the prefix of the next decode.
        self._ids = self._ids[self._read_offset:]
        self._read_offset = len(self._ids)
        self._prefix_text = None
        self._chunks.append(new_text)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
