"""Structured outputs (guided decoding): the generated text is held to a regular expression, one of a list of
choices, or a JSON Schema, as vLLM's `guided_regex` / `guided_choice` / `guided_json` and OpenAI's
`response_format` ask.

    GuidedDecodingParams(json=schema | regex=... | choice=[...] | json_object=True)
        -> a regex (`regex_pattern`; JSON Schemas through ie_jax/json_schema.py)
        -> a DFA over UTF-8 bytes (ie_jax/regex_dfa.py: parse, Thompson NFA, subset construction, minimization)
        -> a TokenGuide over the tokenizer's vocabulary: for each DFA state a request reaches, the tokens allowed
           there as a bitmask, [ceil(V / 32)] uint32, which the sampler applies.

EOS is allowed exactly in accepting states; a state from which no token can continue allows EOS too, so a request
never has every token banned. This module is plain numpy: the engine keeps each request's state on the host and
hands the sampler the state's bitmask (engine/slot_tables.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re

import numpy as np

from ie_jax.json_schema import escape, json_schema_regex, json_value_regex
from ie_jax.regex_dfa import ByteDFA, after_thought, compile_regex


# ---------------------------------------------------------------------------------------------------------------
# What a request asks for, and its automaton over a vocabulary

@dataclasses.dataclass(frozen=True)
class GuidedDecodingParams:
    """One of: `json` (a JSON Schema, as a dict or its JSON text), `regex`, `choice` (strings), or `json_object`
    (any JSON object). vLLM's names. `thought` (set by a server with a reasoning parser): the grammar holds the text
    after a free `<think> ... </think>` block, "open" where the prompt opened it, "optional" where the reply may
    open it with its first bytes (`after_thought`)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    json_object: bool = False
    thought: str | None = None

    def __post_init__(self):
        if isinstance(self.json, dict):  # key order kept: properties are generated in the schema's order
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.json is not None and not isinstance(self.json, str):
            raise ValueError(f"a guided JSON schema must be an object or its JSON text, got {self.json!r}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"a guided regex must be a string, got {self.regex!r}")
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("guided choice needs a non-empty list of non-empty strings")
        given = [self.json is not None, self.regex is not None, self.choice is not None, self.json_object]
        if sum(given) != 1:
            raise ValueError("guided decoding takes exactly one of json, regex, choice or json_object")
        if self.thought not in (None, "open", "optional"):
            raise ValueError(f"thought={self.thought!r} must be None, 'open' or 'optional'")

    def dfa(self) -> ByteDFA:
        dfa = compile_regex(self.regex_pattern())
        return dfa if self.thought is None else after_thought(dfa, opened=self.thought == "open")

    def regex_pattern(self) -> str:
        if self.regex is not None:
            return self.regex
        if self.choice is not None:
            return "(" + "|".join(escape(c) for c in self.choice) + ")"
        if self.json_object:
            return json_value_regex(2, only="object")
        try:
            schema = json.loads(self.json)
        except ValueError as e:
            raise ValueError(f"guided json is not valid JSON: {e}") from e
        return json_schema_regex(schema)


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """The bytes each token adds to the text (None: a special token, never allowed by a guide)."""
    from ie_jax.tokenizer import ByteTokenizer, HFTokenizer, _byte_level_alphabet

    if isinstance(tokenizer, ByteTokenizer):
        return [bytes([i]) if i < 256 else None for i in range(vocab_size)]
    out: list[bytes | None] = [None] * vocab_size
    if isinstance(tokenizer, HFTokenizer):
        inverse = {c: b for b, c in enumerate(_byte_level_alphabet())}
        decoder = json.loads(tokenizer._backend.to_str()).get("decoder") or {}
        byte_level = "ByteLevel" in json.dumps(decoder)
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab_size)))):
            if piece is None or tokenizer.is_special(i):
                continue
            if byte_level and all(c in inverse for c in piece):
                out[i] = bytes(inverse[c] for c in piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                out[i] = bytes([int(piece[3:5], 16)])
            else:
                out[i] = piece.replace("\u2581", " ").encode()
        return out
    for i in range(vocab_size):
        if not tokenizer.is_special(i):
            text = tokenizer.decode([i], skip_special_tokens=False)
            out[i] = text.encode() if "\ufffd" not in text else None
    return out


_serials = itertools.count()


class Vocabulary:
    """A tokenizer's token bytes (`token_bytes`), with what the guides walk built once: the tokens that have text,
    as a zero-padded byte matrix [n, longest] (`bytes`), their ids and their lengths."""

    def __init__(self, tokens: list[bytes | None]):
        self.tokens = tokens
        self.ids = np.array([i for i, data in enumerate(tokens) if data], np.int64)
        self.lens = np.array([len(tokens[i]) for i in self.ids], np.int64)
        self.bytes = np.zeros((len(self.ids), int(self.lens.max(initial=0))), np.uint8)
        flat = np.frombuffer(b"".join(tokens[i] for i in self.ids), np.uint8)
        rows = np.repeat(np.arange(len(self.ids)), self.lens)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(self.lens) - self.lens, self.lens)
        self.bytes[rows, cols] = flat


class FixedGuide:
    """One allowed set for every step (SamplingParams.allowed_token_ids): no state, so nothing waits for tokens."""
    static = True

    def __init__(self, allowed_ids, vocab_size: int):
        self.serial = next(_serials)
        allowed = np.zeros(vocab_size, bool)
        allowed[list(allowed_ids)] = True
        self.bits = pack_bits(allowed[None])[0]

    def advance(self, state: int, token: int) -> int:
        return 0

    def mask(self, state: int) -> np.ndarray:
        return self.bits

    def complete(self, state: int) -> bool:
        return False


class BadWordsGuide:
    """vLLM's bad_words over generated tokens: a word's token sequence must never be completed, so its last token is
    banned wherever the tokens before it were the last ones generated (a one-token word is banned everywhere).
    The state is a node of the words' prefix trie with failure links (Aho-Corasick): the longest suffix of the
    output that begins some word. Static (no waiting for tokens) when every word is one token."""

    def __init__(self, words: list[list[int]], vocab_size: int):
        self.serial = next(_serials)
        self.static = all(len(w) == 1 for w in words)
        children: list[dict[int, int]] = [{}]
        ends: list[set[int]] = [set()]  # node -> the tokens that would complete a word from it
        for w in words:
            node = 0
            for t in w[:-1]:
                if t not in children[node]:
                    children[node][t] = len(children)
                    children.append({})
                    ends.append(set())
                node = children[node][t]
            ends[node].add(w[-1])
        fail = [0] * len(children)
        queue = list(children[0].values())  # breadth first: a node's failure link is settled before its children's
        for node in queue:
            ends[node] |= ends[fail[node]]
            for t, child in children[node].items():
                f = fail[node]
                while f and t not in children[f]:
                    f = fail[f]
                fail[child] = children[f].get(t, 0)
                queue.append(child)
        self.children, self.fail = children, fail
        self.rows = {}
        for node, banned in enumerate(ends):
            allowed = np.ones(vocab_size, bool)
            allowed[[t for t in banned if 0 <= t < vocab_size]] = False
            self.rows[node] = pack_bits(allowed[None])[0]

    def advance(self, state: int, token: int) -> int:
        while state and token not in self.children[state]:
            state = self.fail[state]
        return self.children[state].get(token, 0)

    def mask(self, state: int) -> np.ndarray:
        return self.rows[state]

    def complete(self, state: int) -> bool:
        return False


def bad_word_ids(tokenizer, words) -> list[list[int]]:
    """Each word's token ids as vLLM derives them: the word (left-stripped) alone, plus its form after a space where
    that is as many tokens with another first one (a word-initial token of a BPE vocabulary)."""
    out = []
    for word in words:
        ids = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(ids)
        if len(spaced) == len(ids) and spaced[0] != ids[0]:
            out.append(spaced)
    return [w for w in out if w]


class TokenGuide:
    """A DFA lifted to tokens: per state, the allowed set as a bitmask (`rows[state]`, [ceil(V / 32)] uint32, bit
    v % 32 of word v // 32). The states nearest the start (breadth first, up to `eager_states`) are computed when
    the guide is built; the rest when a request first reaches them (`mask`), so a schema with thousands of states
    (counted repetitions: maxLength, maxItems) does not hold its first request up for all of them. Next states
    are not stored ([S, V] of them would take gigabytes for a large schema and vocabulary): `advance` walks the
    sampled token's bytes through the DFA, a few lookups a token."""
    static = False  # the allowed set depends on the text so far
    eager_states = 256

    def __init__(self, dfa: ByteDFA, vocab: "Vocabulary | list[bytes | None]", eos_ids: tuple[int, ...]):
        self.serial = next(_serials)  # tells guides apart for as long as the process lives (id() may be reused)
        if not isinstance(vocab, Vocabulary):
            vocab = Vocabulary(vocab)
        self._ids, self._lens, self._bytes = vocab.ids, vocab.lens, vocab.bytes
        vocab = vocab.tokens
        self.vocab_size, self.dead = len(vocab), dfa.delta.shape[0]
        self.delta = np.concatenate([np.where(dfa.delta < 0, self.dead, dfa.delta),
                                     np.full((1, 256), self.dead, np.int32)])  # the dead state loops on itself
        self.accepting, self.vocab = dfa.accepting, vocab
        self.eos = [e for e in eos_ids if 0 <= e < len(vocab)]
        self.rows: dict[int, np.ndarray] = {}  # DFA state -> its allowed tokens as bits
        self._complete: dict[int, bool] = {}  # DFA state -> EOS is the only token allowed (`complete`)
        frontier = [0]
        while frontier and len(self.rows) < self.eager_states:  # breadth first, a frontier's states at once
            reached = set()
            for chunk in range(0, len(frontier), 64):
                states = frontier[chunk:chunk + 64]
                block = self.next_states(states)
                self.rows.update(zip(states, pack_bits(block >= 0)))
                reached.update(np.unique(block[block >= 0]).tolist())
            frontier = sorted(x for x in reached if x not in self.rows)

    def next_states(self, states: list[int]) -> np.ndarray:
        """[len(states), V]: each token's next state from each of `states`, -1 where it is not allowed. EOS is
        allowed (staying put) in accepting states, and where no token can continue."""
        F, n, D = len(states), len(self._ids), self.dead
        block = np.full((F, self.vocab_size), -1, np.int32)
        # (state, token) pairs walked byte by byte; a pair leaves when its token ends (recorded) or the DFA dies,
        # so after the first byte a restrictive state (a digit, a quote) carries only the few tokens that fit
        row = np.repeat(np.arange(F), n)
        tok = np.tile(np.arange(n), F)
        cur = np.repeat(np.array(states, np.int64), n)
        for j in range(self._bytes.shape[1]):
            cur = self.delta[cur, self._bytes[tok, j]]
            live = cur != D
            row, tok, cur = row[live], tok[live], cur[live]
            ends = self._lens[tok] == j + 1
            block[row[ends], self._ids[tok[ends]]] = cur[ends]
            row, tok, cur = row[~ends], tok[~ends], cur[~ends]
            if not len(cur):
                break
        for row, state in zip(block, states):
            if self.accepting[state] or not (row >= 0).any():
                row[self.eos] = state
        return block

    def advance(self, state: int, token: int) -> int:
        """The state after `token` (EOS, or a token the guide did not allow, leaves the state as it was)."""
        s = state
        for b in self.vocab[token] or b"":
            s = int(self.delta[s, b])
        return state if s == self.dead or not self.vocab[token] else s

    def mask(self, state: int) -> np.ndarray:
        row = self.rows.get(state)
        if row is None:  # first reached now: one state through the vocabulary (~1.4 ms at 32k tokens)
            row = self.rows[state] = pack_bits(self.next_states([state]) >= 0)[0]
        return row

    def complete(self, state: int) -> bool:
        """Whether the text is finished: EOS is the only token allowed. min_tokens then gives way (the engine lifts
        its EOS ban for the row), since nothing else could follow."""
        if state not in self._complete:
            bits = self.mask(state).copy()
            for e in self.eos:
                bits[e // 32] &= ~np.uint32(1 << (e % 32))
            self._complete[state] = not bits.any()
        return self._complete[state]

    def allowed(self, state: int) -> np.ndarray:
        bits = self.mask(state)
        v = np.arange(self.vocab_size)
        return np.flatnonzero((bits[v // 32] >> (v % 32)) & 1)


def pack_bits(allowed: np.ndarray) -> np.ndarray:
    """[..., V] bool -> [..., ceil(V / 32)] uint32 with token v at bit v % 32 of word v // 32."""
    V = allowed.shape[-1]
    padded = np.zeros(allowed.shape[:-1] + (-(-V // 32) * 32,), np.uint64)
    padded[..., :V] = allowed
    weights = np.uint64(1) << np.arange(32, dtype=np.uint64)
    return (padded.reshape(*allowed.shape[:-1], -1, 32) * weights).sum(-1).astype(np.uint32)
