"""Structured outputs (guided decoding): the generated text is held to a regular expression, one of a list of
choices, or a JSON Schema, as vLLM's `guided_regex` / `guided_choice` / `guided_json` and OpenAI's
`response_format` ask.

    GuidedDecodingParams(json=schema | regex=... | choice=[...] | json_object=True)
        -> a regex (`regex_pattern`; JSON Schemas through ie_jax/json_schema.py)
        -> a DFA over UTF-8 bytes (`compile_regex`: parse, Thompson NFA, subset construction, minimization)
        -> a TokenGuide over the tokenizer's vocabulary: for each DFA state a request reaches, the tokens allowed
           there as a bitmask, [ceil(V / 32)] uint32, which the sampler applies.

Text is matched as bytes, so a token may end in the middle of a UTF-8 character and the automaton still tracks it.
EOS is allowed exactly in accepting states; a state from which no token can continue allows EOS too, so a request
never has every token banned. The regex dialect: literals, `.`, classes `[a-z]` `[^...]`, escapes `\\d \\w \\s \\D
\\W \\S` (ASCII classes, as Python's re.ASCII) and `\\.`-style, groups `(...)` `(?:...)`, `|`, `* + ?`, `{m}` `{m,}`
`{m,n}`; the whole text must match (no anchors needed). `.` and negated classes match whole UTF-8 characters, so
the text stays valid UTF-8. Backreferences and lookaround are refused. This module is plain numpy: the engine
keeps each request's state on the host and hands the sampler the state's bitmask (engine/slot_tables.py).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re

import numpy as np

from ie_jax.json_schema import escape, json_schema_regex, json_value_regex

MAX_NFA_STATES = 200_000
MAX_DFA_STATES = 20_000


def _bits(byte_values) -> int:
    out = 0
    for b in byte_values:
        out |= 1 << b
    return out


ASCII = (1 << 128) - 1
_DIGIT = _bits(range(48, 58))
_WORD = _DIGIT | _bits(range(65, 91)) | _bits(range(97, 123)) | _bits([95])
_SPACE = _bits(b" \t\n\r\f\v")
# class escapes: (ASCII bytes, whether every non-ASCII character matches too)
_CLASS_ESCAPES = {"d": (_DIGIT, False), "w": (_WORD, False), "s": (_SPACE, False), "D": (ASCII & ~_DIGIT, True),
                  "W": (ASCII & ~_WORD, True), "S": (ASCII & ~_SPACE, True)}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


def _range(lo: int, hi: int):
    return ("set", _bits(range(lo, hi + 1)))


_CONT = _range(0x80, 0xBF)
# Any well-formed UTF-8 encoding of a non-ASCII character (RFC 3629), byte by byte: what `.` and negated classes
# match beyond ASCII, so that the text stays valid UTF-8.
UTF8_NON_ASCII = ("alt", [
    ("cat", [_range(0xC2, 0xDF), _CONT]),
    ("cat", [("set", 1 << 0xE0), _range(0xA0, 0xBF), _CONT]),
    ("cat", [("set", _bits([*range(0xE1, 0xED), 0xEE, 0xEF])), _CONT, _CONT]),
    ("cat", [("set", 1 << 0xED), _range(0x80, 0x9F), _CONT]),
    ("cat", [("set", 1 << 0xF0), _range(0x90, 0xBF), _CONT, _CONT]),
    ("cat", [_range(0xF1, 0xF3), _CONT, _CONT, _CONT]),
    ("cat", [("set", 1 << 0xF4), _range(0x80, 0x8F), _CONT, _CONT])])


def _chars(ascii_bits: int, non_ascii: bool):
    """A node matching one character: an ASCII byte in `ascii_bits`, or (non_ascii) any non-ASCII character."""
    return ("alt", [("set", ascii_bits), UTF8_NON_ASCII]) if non_ascii else ("set", ascii_bits)


# ---------------------------------------------------------------------------------------------------------------
# Regex -> AST. Nodes: ("set", bits) one byte, ("cat", [nodes]), ("alt", [nodes]), ("rep", node, min, max|None).

class _Parser:
    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"regex {self.p!r}: {what} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        c = self.p[self.i]
        self.i += 1
        return c

    def parse(self):
        node = self.alternation()
        if self.i != len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def alternation(self):
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.take()
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.repetition())
        return ("cat", items)

    def repetition(self):
        node = self.atom()
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.take()
                node = ("rep", node, 0 if c != "+" else 1, 1 if c == "?" else None)
            elif c == "{" and re.match(r"\{\d*(,\d*)?\}", self.p[self.i:]):
                m = re.match(r"\{(\d*)(,?)(\d*)\}", self.p[self.i:])
                self.i += m.end()
                lo = int(m.group(1) or 0)
                hi = lo if not m.group(2) else (int(m.group(3)) if m.group(3) else None)
                if hi is not None and hi < lo:
                    raise self.error(f"repeat {{{lo},{hi}}} has max < min")
                node = ("rep", node, lo, hi)
            else:
                return node
            if self.peek() in ("?", "+"):  # lazy / possessive markers: the language is the same
                self.take()

    def atom(self):
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.error("lookaround and inline flags are not supported")
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.take()
            return node
        if c == "[":
            return self.char_class()
        if c == ".":
            return _chars(ASCII & ~_bits(b"\n"), True)
        if c in "^$":
            return ("cat", [])  # the whole text matches anyway
        if c == "\\":
            return self.escape(in_class=False)
        if c in "*+?":
            raise self.error(f"nothing to repeat before {c!r}")
        return _literal(c)

    def escape(self, in_class: bool):
        """After a backslash: a node (outside a class), or in a class a (ASCII bits, non-ASCII) pair or a char."""
        if self.peek() is None:
            raise self.error("trailing backslash")
        c = self.take()
        if c in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[c] if in_class else _chars(*_CLASS_ESCAPES[c])
        if c.isdigit() and c != "0" or c in "bBAzZ":
            raise self.error(f"\\{c} (backreferences and word anchors) is not supported")
        if c in "ux":  # hex escapes: \uXXXX, \xXX
            n = 4 if c == "u" else 2
            code = self.p[self.i:self.i + n]
            if not re.fullmatch("[0-9a-fA-F]{%d}" % n, code):
                raise self.error(f"\\{c} needs {n} hex digits")
            self.i += n
            c = chr(int(code, 16))
        else:
            c = _CHAR_ESCAPES.get(c, c)
        return c if in_class else _literal(c)

    def char_class(self):
        """`[...]` over ASCII; a negated class also matches every non-ASCII character."""
        negate = self.peek() == "^"
        if negate:
            self.take()
        bits, non_ascii, first = 0, False, True
        while True:
            if self.peek() is None:
                raise self.error("missing ']'")
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                c = self.escape(in_class=True)
                if isinstance(c, tuple):  # \d, \w, ...
                    bits, non_ascii = bits | c[0], non_ascii or c[1]
                    continue
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.take()
                hi = self.take()
                if hi == "\\":
                    hi = self.escape(in_class=True)
                    if isinstance(hi, tuple):
                        raise self.error("a class range needs single characters")
                if ord(hi) < ord(c):
                    raise self.error(f"bad range {c}-{hi}")
                if ord(hi) >= 128:
                    raise self.error("ranges of non-ASCII characters are not supported")
                bits |= _bits(range(ord(c), ord(hi) + 1))
            elif ord(c) < 128:
                bits |= 1 << ord(c)
            else:
                raise self.error(f"non-ASCII character {c!r} in a class is not supported")
        return _chars(ASCII & ~bits, not non_ascii) if negate else _chars(bits, non_ascii)


def _literal(ch: str):
    data = ch.encode("utf-8")
    return ("set", 1 << data[0]) if len(data) == 1 else ("cat", [("set", 1 << b) for b in data])


# ---------------------------------------------------------------------------------------------------------------
# AST -> NFA (Thompson) -> DFA (subset construction)

class _NFA:
    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int]]] = []  # (byte bitset, target)

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise ValueError(f"the pattern needs more than {MAX_NFA_STATES} automaton states; simplify it")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node) -> tuple[int, int]:
        kind = node[0]
        if kind == "set":
            s, e = self.new(), self.new()
            self.edges[s].append((node[1], e))
            return s, e
        if kind == "cat":
            s = e = self.new()
            for item in node[1]:
                a, b = self.build(item)
                self.eps[e].append(a)
                e = b
            return s, e
        if kind == "alt":
            s, e = self.new(), self.new()
            for item in node[1]:
                a, b = self.build(item)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        _, item, lo, hi = node
        s = e = self.new()
        for _ in range(lo):
            a, b = self.build(item)
            self.eps[e].append(a)
            e = b
        if hi is None:  # a loop: e -> item -> e
            a, b = self.build(item)
            self.eps[e].append(a)
            self.eps[b].append(e)
            return s, e
        end = self.new()
        self.eps[e].append(end)
        for _ in range(hi - lo):
            a, b = self.build(item)
            self.eps[e].append(a)
            self.eps[b].append(end)
            e = b
        return s, end


@dataclasses.dataclass(frozen=True)
class ByteDFA:
    delta: np.ndarray  # [D, 256] int32: next state of each byte, -1 = no match possible
    accepting: np.ndarray  # [D] bool

    def matches(self, data: bytes) -> bool:
        s = 0
        for b in data:
            s = int(self.delta[s, b])
            if s < 0:
                return False
        return bool(self.accepting[s])


@functools.lru_cache(maxsize=64)
def compile_regex(pattern: str) -> ByteDFA:
    """The pattern's DFA over UTF-8 bytes; start state 0. Raises ValueError for what the dialect lacks. Cached:
    the server checks a request's pattern before the engine builds its guide."""
    nfa = _NFA()
    start, final = nfa.build(_Parser(pattern).parse())

    def closure(states) -> frozenset:
        seen, stack = set(states), list(states)
        while stack:
            for t in nfa.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)

    # Bytes that every edge treats alike form one class (digits, letters, ...): the construction walks classes, tens
    # of them, not 256 bytes.
    edge_sets = sorted({bits for edges in nfa.edges for bits, _ in edges})
    signature = [tuple(bits >> b & 1 for bits in edge_sets) for b in range(256)]
    class_of = {sig: i for i, sig in enumerate(dict.fromkeys(signature))}
    byte_class = np.array([class_of[sig] for sig in signature])
    members = [_bits(np.flatnonzero(byte_class == c).tolist()) for c in range(len(class_of))]

    first = closure([start])
    ids, order, rows, closures = {first: 0}, [first], [], {}
    while len(rows) < len(order):
        current = order[len(rows)]
        edges = [edge for s in current for edge in nfa.edges[s]]
        row = np.full(len(members), -1, np.int32)
        for c, bits_of_class in enumerate(members):
            targets = frozenset(t for bits, t in edges if bits & bits_of_class)
            if not targets:
                continue
            nxt = closures.get(targets)
            if nxt is None:
                nxt = closures[targets] = closure(targets)
            if nxt not in ids:
                if len(order) >= MAX_DFA_STATES:
                    raise ValueError(f"the pattern needs more than {MAX_DFA_STATES} DFA states; simplify it")
                ids[nxt] = len(order)
                order.append(nxt)
            row[c] = ids[nxt]
        rows.append(row)
    accepting = np.array([final in st for st in order], bool)
    small = _minimize(np.stack(rows), accepting)  # on byte classes: tens of columns, not 256
    return ByteDFA(np.ascontiguousarray(small.delta[:, byte_class]), small.accepting)


def _row_groups(rows: np.ndarray) -> np.ndarray:
    """Equal rows of an int matrix [D, W] (values in [-1, D]) -> the same group id, in [0, groups). np.unique over
    rows sorts them as opaque records, several times slower: here the columns are packed as many to an int64 as
    their bits allow and sorted as keys, then neighbours compared."""
    D, W = rows.shape
    shifted = (rows + 1).astype(np.int64)
    bits = max(int(shifted.max()).bit_length(), 1)
    per = max(63 // bits, 1)
    keys = [np.zeros(D, np.int64) for _ in range(-(-W // per))]
    for j in range(W):
        keys[j // per] = (keys[j // per] << bits) | shifted[:, j]
    order = np.lexsort(keys[::-1])  # the first key primary
    packed = np.stack(keys, axis=1)[order]
    starts = np.ones(D, bool)
    starts[1:] = (packed[1:] != packed[:-1]).any(axis=1)
    groups = np.empty(D, np.int64)
    groups[order] = np.cumsum(starts) - 1
    return groups


def _minimize(delta: np.ndarray, accepting: np.ndarray) -> ByteDFA:
    """Moore's partition refinement: states that accept the same continuations merge (the subset construction
    leaves many twins, e.g. one per copy of a repeated sub-pattern). State 0 stays the start."""
    D = delta.shape[0]
    ext = np.where(delta < 0, D, delta)  # D: the dead state, its own class
    classes = np.append(accepting.astype(np.int64), -1)
    count = len(np.unique(classes[:-1]))
    while True:
        signature = np.concatenate([classes[:-1, None], classes[ext]], axis=1)  # [D, 1 + columns]
        new = np.append(_row_groups(signature), -1)
        if new.max() + 1 == count:  # refinement only splits: the same number of classes is the fixed point
            break
        classes, count = new, new.max() + 1
    # renumber so that the start state's class is 0, then the rest in order of first appearance
    order = list(dict.fromkeys(classes[:-1].tolist()))
    order.remove(classes[0])
    rank = {c: i for i, c in enumerate([classes[0], *order])}
    state_class = np.array([rank[c] for c in classes[:-1]])
    first = {rank[c]: s for s, c in reversed(list(enumerate(classes[:-1].tolist())))}
    reps = np.array([first[i] for i in range(len(rank))])
    small = np.where(delta[reps] < 0, -1, state_class[np.maximum(delta[reps], 0)])
    return ByteDFA(small.astype(np.int32), accepting[reps])


def after_thought(dfa: ByteDFA, opened: bool, start: bytes = b"<think>", end: bytes = b"</think>",
                  spaces: int = 4) -> ByteDFA:
    """`dfa` behind a thought: any bytes up to the first `end`, then up to `spaces` spaces, then `dfa`'s text.
    `opened`: the text starts in the thought; else it enters one only by starting with `start`, and otherwise is
    `dfa`'s text at once (after the spaces). States: the `start` chain (tracking `dfa` beside it), the thought (a
    KMP automaton of `end`), the spaces, then `dfa`'s own. The thought accepts nowhere, so EOS waits for the block
    to close; the spaces are bounded, so a model cannot idle there."""
    n, m, e = dfa.delta.shape[0], 0 if opened else len(start), len(end)
    T, W, P = m, m + e, m + e + spaces + 1  # first thought state, the spaces, dfa's start
    delta = np.full((P + n, 256), -1, np.int32)
    accepting = np.zeros(P + n, bool)
    delta[P:] = np.where(dfa.delta < 0, -1, dfa.delta + P)
    accepting[P:] = dfa.accepting
    blank = np.frombuffer(b" \t\n\r", np.uint8)
    blank = blank[dfa.delta[0, blank] < 0]  # spaces dfa would not take itself
    for i in range(spaces + 1):  # W + i: i spaces read
        delta[W + i] = delta[P]
        delta[W + i, blank] = W + i + 1 if i < spaces else -1
        accepting[W + i] = dfa.accepting[0]
    for k in range(e):  # thought state T + k: the last k bytes are end[:k]
        for b in range(256):
            seen = end[:k] + bytes([b])
            j = next(j for j in range(min(len(seen), e), -1, -1) if seen.endswith(end[:j]))
            delta[T + k, b] = W if j == e else T + j
    p = W  # dfa's side of the start chain: where the bytes read so far would have taken it
    for k in range(m):
        delta[k] = delta[p] if p >= 0 else -1
        delta[k, start[k]] = T if k + 1 == m else k + 1
        accepting[k] = p >= 0 and accepting[p]
        p = int(delta[p, start[k]]) if p >= 0 else -1  # rows p >= W: never the chain's own
    return ByteDFA(delta, accepting)


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
