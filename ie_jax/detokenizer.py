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

Two decodes per token are a large share of the serving engine's host time per step, so `make_detokenizer` picks a
faster detokenizer with the same output where the tokenizer offers one: `StreamDetokenizer` runs this scheme
inside `tokenizers` (one Rust call per token) for Hugging Face tokenizers, and `WordDetokenizer` needs no window at
all for `SyntheticTokenizer`. The reference scheme, `IncrementalDetokenizer`, knows only `Tokenizer.decode`.

No detokenizer matches stop strings or holds text back for them (the engine does, on `text`), and none applies
transformers' clean-up of spaces before punctuation.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import tokenizers
from tokenizers.decoders import DecodeStream

from ie_jax.tokenizer import Tokenizer, vocabulary_error

# Prompt ids kept as left context for the first generated tokens: enough for a decoder's start-of-text rules
# and for a character whose bytes began in the prompt.
PROMPT_CONTEXT_TOKENS = 5

# Most tokens one character can take: 4 UTF-8 bytes, each a byte token in the worst case, twice over for slack.
MAX_CHARACTER_TOKENS = 8

_REPLACEMENT = "\ufffd"


class _Emitted:
    """The text a detokenizer has emitted, kept as pieces and joined when read."""
    _chunks: list[str]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""


class IncrementalDetokenizer(_Emitted):
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
        return self._advance(full[len(self._prefix_text):])

    def _advance(self, new_text: str) -> str:
        """Record `new_text` as emitted and slide the window: the ids just read become the prefix of the next decode."""
        self._ids = self._ids[self._read_offset:]
        self._read_offset = len(self._ids)
        self._prefix_text = None
        self._chunks.append(new_text)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def make_detokenizer(tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
    """The fastest exact detokenizer for `tokenizer`: the one its `incremental_detokenizer` gives, else
    `IncrementalDetokenizer` (which needs only `decode`, so minimal test doubles still work).

    Every detokenizer has IncrementalDetokenizer's interface (`add`, `flush`, `text`) and output.
    """
    factory = getattr(tokenizer, "incremental_detokenizer", None)
    if factory is None:
        return IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    return factory(prompt_ids, skip_special_tokens)


# Decoders that give each token its text on its own (bytes concatenated, "▁" replaced, byte-fallback runs joined)
# and at most strip spaces at the start of the text. For these, the exceptions listed in StreamDetokenizer are the
# only places where DecodeStream and IncrementalDetokenizer differ.
_STREAM_DECODERS = frozenset({"ByteFallback", "ByteLevel", "Fuse", "Metaspace", "Replace"})


def _stream_decoder(decoder: dict) -> bool:
    kind = decoder.get("type")
    if kind == "Sequence":
        return bool(decoder["decoders"]) and all(_stream_decoder(d) for d in decoder["decoders"])
    if kind == "Strip":
        return decoder.get("content") == " " and decoder.get("stop") == 0
    return kind in _STREAM_DECODERS


class StreamDetokenizer(IncrementalDetokenizer):
    """IncrementalDetokenizer's output for a Hugging Face tokenizer at one `tokenizers` DecodeStream call per token.

    DecodeStream runs the same window scheme in Rust (its prefix is the reference's prefix text, its prefix index the
    read offset), so while it holds the same window it emits the same text. This class still keeps the window's ids
    (an append per token) so that flush() and the slow path can decode them. Three cases part the two schemes; in
    each, add() decodes in Python as IncrementalDetokenizer does until the next emission, then starts a new stream:
    - a window whose text ends in U+FFFD (a prompt that ends mid-character): a new stream takes an empty prefix;
    - an empty prefix text followed by ids whose text is empty too: the stream counts those ids as read, so its
      next window would lack them;
    - a decode that no longer starts with the prefix text (a byte-fallback run made invalid by a later byte):
      the stream raises where the reference emits.
    `supports` admits only decoders for which these are all the cases; other tokenizers use IncrementalDetokenizer.

    Measured on this CPU (1,000 streams x 32 tokens, 32k BPE), us/token vs the reference: byte-level 1.5 vs 3.7,
    byte-fallback 3.0 vs 4.7 (where the Rust decoder itself takes 2.9).
    """

    def __init__(self, tokenizer: Tokenizer, backend: tokenizers.Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        super().__init__(tokenizer, prompt_ids, skip_special_tokens)
        self._backend = backend  # the Rust tokenizer behind `tokenizer`
        self._vocab_size = tokenizer.vocab_size
        self._stream: DecodeStream | None = None  # None: add() decodes in Python until `_resync` succeeds
        self._blank_prefix = False  # False only when the prefix text is known to be non-empty

    @staticmethod
    def supports(backend: tokenizers.Tokenizer) -> bool:
        """Whether `backend`'s decoder keeps DecodeStream in step with IncrementalDetokenizer."""
        decoder = backend.decoder
        return decoder is not None and _stream_decoder(json.loads(decoder.__getstate__()))

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < self._vocab_size:
            raise vocabulary_error(token_id, self._vocab_size)
        if self._stream is None and not self._resync():
            return super().add(token_id)
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception:  # the decode no longer starts with the prefix text: the reference emits the difference
            self._stream = None
            return super().add(token_id)
        self._ids.append(token_id)
        if text is None:
            if self._blank_prefix and self._stream_skips_ahead():
                self._stream = None
            return ""
        # The next prefix text is this window's; it can only be empty if the new text is spaces that the decoder
        # strips at the start of a window.
        self._blank_prefix = not text.strip(" ")
        return self._advance(text)

    def flush(self) -> str:
        self._stream = None  # flush slides the window past ids the stream still holds
        return super().flush()

    def _resync(self) -> bool:
        """Start a stream on the current window if it will take the reference's prefix: nothing may be pending (the
        stream would count it as read), and the window's text must not end in U+FFFD (it would not be a prefix)."""
        if self._read_offset != len(self._ids):
            return False
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids)
        if self._prefix_text.endswith(_REPLACEMENT):
            return False
        self._stream = DecodeStream(self._ids, self._skip_special_tokens)
        self._blank_prefix = not self._prefix_text
        return True

    def _stream_skips_ahead(self) -> bool:
        """Whether the stream's next step will count the pending ids as read.

        A stream whose prefix text is empty re-decodes its window at the start of each step and, when that text does
        not end in U+FFFD, makes the whole window its prefix. The reference keeps those ids pending.
        """
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[:self._read_offset])
        if self._prefix_text:
            self._blank_prefix = False
            return False
        return not self._decode(self._ids).endswith(_REPLACEMENT)


class WordDetokenizer(_Emitted):
    """IncrementalDetokenizer's output for `SyntheticTokenizer` without decoding: each id is the whole word " w{i}",
    whatever its neighbours, so add() returns that word ("" for a skipped special id) and nothing is held back.

    Measured on this CPU, 1,000 streams x 32 tokens, 32k vocabulary: 0.3 us per token (IncrementalDetokenizer 4.1).
    """

    def __init__(self, vocab_size: int, hidden_ids: frozenset[int] = frozenset()):
        self._vocab_size = vocab_size
        self._hidden_ids = hidden_ids  # the special ids when they are skipped
        self._chunks: list[str] = []

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 0 <= token_id < self._vocab_size:
            raise vocabulary_error(token_id, self._vocab_size)
        if token_id in self._hidden_ids:
            return ""
        word = f" w{token_id}"
        self._chunks.append(word)
        return word

    def flush(self) -> str:
        return ""
