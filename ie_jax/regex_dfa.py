"""Regular expressions as automata over UTF-8 bytes, for structured outputs (ie_jax/guided.py lifts them to tokens).

`compile_regex(pattern)` parses the pattern, builds a Thompson NFA, runs the subset construction over byte classes
and minimizes the result into a `ByteDFA` (start state 0, -1 where no match is possible). `after_thought` puts a
free `<think> ... </think>` block in front of a DFA, for reasoning models.

Text is matched as bytes, so a token may end in the middle of a UTF-8 character and the automaton still tracks it.
The dialect: literals, `.`, classes `[a-z]` `[^...]`, escapes `\\d \\w \\s \\D \\W \\S` (ASCII classes, as Python's
re.ASCII) and `\\.`-style, groups `(...)` `(?:...)`, `|`, `* + ?`, `{m}` `{m,}` `{m,n}`; the whole text must match
(no anchors needed). `.` and negated classes match whole UTF-8 characters, so the text stays valid UTF-8.
Backreferences and lookaround are refused. Plain numpy.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

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
