"""Structured outputs: the byte-level regex automaton against Python's re, JSON Schemas against valid and invalid
instances, token guides against a brute-force walk of the vocabulary, and the engine's guided greedy decoding
against a host loop that masks the dense forward's logits."""
import json
import random
import re
import tempfile

import jax
import numpy as np
import pytest

import ie_jax
from engine.llm import LLM
from fixtures.tokenizers.make_tokenizers import build_byte_level, build_sentencepiece
from ie_jax import SamplingParams
from ie_jax.guided import GuidedDecodingParams, TokenGuide, token_bytes
from ie_jax.regex_dfa import after_thought, compile_regex
from ie_jax.json_schema import json_schema_regex
from ie_jax.tokenizer import ByteTokenizer, load_tokenizer

PATTERNS = [r"[0-9]{3}-[a-z]{2}", r"(ab|a)*c?", r"\d+(\.\d+)?", r"(cat|dog|bird|é)", r"[^ab]{2,4}x", r"a.b",
            r"(x|y){0,3}z+", r"(a|ab)(c|bcd)(d*)", r"[\w-]+", r"\W\S?", r'"([^"\\\x00-\x1f]|\\["\\/bfnrt])*"',
            r"[a\-z]+", r"\u00e9+中?", r"(?:ab){2,}|c{,2}"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_automaton_matches_python_re(pattern):
    dfa = compile_regex(pattern)
    rng = random.Random(hash(pattern) % 1000)
    alphabet = list("abcdxyz0129.- \n\"\\é中") + ["\x01"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert dfa.matches(text.encode()) == bool(re.fullmatch(pattern, text, re.ASCII)), (pattern, text)


def test_regex_keeps_text_valid_utf8_and_refuses_what_it_lacks():
    dot = compile_regex(".*")
    assert dot.matches("é中😀".encode()) and not dot.matches(b"\xff") and not dot.matches("é".encode()[:1])
    for bad, word in ((r"(a", "missing"), (r"a)", "unbalanced"), (r"(?=a)", "lookaround"), (r"(a)\1", "backref"),
                      (r"*a", "nothing to repeat"), (r"a{3,1}", "max < min"), (r"[z-a]", "bad range")):
        with pytest.raises(ValueError, match=word):
            compile_regex(bad)


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}, "score": {"type": "number"},
    "tags": {"type": "array", "items": {"enum": ["a", "b c"]}, "maxItems": 3}, "ok": {"type": "boolean"},
    "pet": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pet"}]}},
    "required": ["name", "age", "score", "tags", "ok", "pet"],
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}}}


def test_json_schema_regex_accepts_instances_and_rejects_violations():
    dfa = compile_regex(json_schema_regex(SCHEMA))
    good = [{"name": "bob", "age": 3, "score": -1.5e3, "tags": ["a", "b c"], "ok": True, "pet": None},
            {"name": "é\"x\\", "age": 0, "score": 2, "tags": [], "ok": False, "pet": {"kind": "cat"}}]
    for obj in good:
        for text in (json.dumps(obj, ensure_ascii=False), json.dumps(obj, separators=(",", ":"))):
            assert dfa.matches(text.encode()), text
    bad = [dict(good[0], age=1.5), dict(good[0], name="x" * 9), dict(good[0], tags=["a"] * 4),
           dict(good[0], ok="yes"), dict(good[0], pet={"kind": "dog"}), {k: v for k, v in good[0].items() if k != "ok"}]
    for obj in bad:
        assert not dfa.matches(json.dumps(obj, ensure_ascii=False).encode()), obj
    assert not dfa.matches(json.dumps(good[0], indent=2).encode())  # at most one space between tokens
    with pytest.raises(ValueError, match="not supported"):
        json_schema_regex({"type": "object", "properties": {"x": {"type": "date"}}})
    # a constraint the regex cannot hold is refused, never silently broken
    for bad in ({"type": "integer", "maximum": 3}, {"type": "integer", "minimum": 5}, {"allOf": [{}]},
                {"type": "array", "items": [{}]}, {"type": "number", "exclusiveMinimum": 0},
                {"type": "object", "properties": {"a": {}}, "maxProperties": 0}):
        with pytest.raises(ValueError, match="not supported|must fit"):
            json_schema_regex(bad)
    counts = compile_regex(json_schema_regex({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0}, "k": {"type": "integer", "exclusiveMinimum": 0},
        "x": {"type": "number", "minimum": 0}}, "required": ["n"], "title": "t", "additionalProperties": False}))
    assert counts.matches(b'{"n": 0, "k": 3, "x": 0.5}')
    for text in (b'{"n": -1, "k": 3, "x": 0.5}', b'{"n": 0, "k": 0, "x": 0.5}', b'{"n": 0, "k": 3, "x": -2}'):
        assert not counts.matches(text)


def test_properties_not_required_may_be_left_out():
    """JSON Schema's `required`: the other properties are optional, in the schema's order, commas only between the
    ones present; every subset of the optional ones is accepted, nothing else."""
    import itertools
    props = {k: {"type": "integer"} for k in "abcde"}
    for required in ([], ["c"], ["a", "e"], list("abcde")):
        dfa = compile_regex(json_schema_regex({"type": "object", "properties": props, "required": required}))
        for n in range(6):
            for keys in itertools.combinations("abcde", n):
                obj = {k: i for i, k in enumerate(keys)}
                text = json.dumps(obj)
                assert dfa.matches(text.encode()) == (set(required) <= set(keys)), (required, text)
                assert dfa.matches(json.dumps(obj, separators=(",", ":")).encode()) == (set(required) <= set(keys))
        for text in ('{"b": 1, "a": 2}', '{, "a": 1}', '{"a": 1,}', '{"a": 1 "b": 2}', '{"a": 1, , "b": 2}'):
            assert not dfa.matches(text.encode()), (required, text)  # out of order, stray or missing commas
    with pytest.raises(ValueError, match="not among the properties"):
        json_schema_regex({"type": "object", "properties": {"a": {}}, "required": ["b"]})
    with pytest.raises(ValueError, match="must fit"):
        json_schema_regex({"type": "object", "properties": {"a": {}, "b": {}}, "minProperties": 1})


def _tokenizers():
    tmp = tempfile.mkdtemp()
    return {"bytes": ByteTokenizer(), "byte-level BPE": load_tokenizer(build_byte_level(tmp + "/bl")),
            "sentencepiece": load_tokenizer(build_sentencepiece(tmp + "/sp"))}


@pytest.mark.parametrize("name", ["bytes", "byte-level BPE", "sentencepiece"])
def test_token_guide_equals_a_brute_force_walk(name):
    tok = _tokenizers()[name]
    vocab = token_bytes(tok, tok.vocab_size)
    assert all(v is None or tok.decode([i]).encode() in (v, v.lstrip(b" ")) or "\ufffd" in tok.decode([i])
               for i, v in enumerate(vocab))
    dfa = compile_regex(GuidedDecodingParams(json=SCHEMA).regex_pattern())
    guide = TokenGuide(dfa, vocab, tok.eos_token_ids)
    eos = set(tok.eos_token_ids)
    for state in list(guide.rows)[:40]:
        want = []
        for i, data in enumerate(vocab):
            s = state
            for b in data or b"":
                s = int(dfa.delta[s, b])
                if s < 0:
                    break
            if data and s >= 0:
                want.append((i, s))
        got = guide.next_states([state])[0]
        assert [(i, int(got[i])) for i in np.flatnonzero(got >= 0) if i not in eos] == want
        assert all((got[e] >= 0) == (bool(dfa.accepting[state]) or not want) for e in eos)
        bits = guide.mask(state)
        unpacked = (bits[np.arange(tok.vocab_size) // 32] >> (np.arange(tok.vocab_size) % 32)) & 1
        np.testing.assert_array_equal(unpacked.astype(bool), got >= 0)


@pytest.fixture(scope="module")
def tiny():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=1)


def last_logits(model, ids: list[int]) -> np.ndarray:
    """The dense forward's logits at the last of `ids`, computed over them padded on the right to a multiple of
    128: the forward is causal, so the padding cannot reach them, and every length shares one compiled forward
    (not one per length)."""
    padded = np.zeros((1, -(-len(ids) // 128) * 128), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(ie_jax.forward(model, padded)[0, len(ids) - 1])


def masked_greedy(model, tok, prompt: str, guide: TokenGuide, max_tokens: int) -> list[int]:
    """Greedy decoding by hand: the dense forward's last logits, restricted to the guide's allowed tokens."""
    ids, out, state = tok.encode(prompt), [], 0
    for _ in range(max_tokens):
        logits = last_logits(model, ids)
        allowed = np.zeros(len(logits), bool)
        allowed[guide.allowed(state)] = True
        t = int(np.argmax(np.where(allowed, logits, -np.inf)))
        out.append(t)
        if t in tok.eos_token_ids:
            break
        ids, state = ids + [t], guide.advance(state, t)
    return out


def test_engine_guided_greedy_matches_the_masked_reference_beside_free_requests(tiny):
    model, tok = tiny
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4},
                                               "n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["name", "n"]}  # "ok" may be left out
    specs = [GuidedDecodingParams(choice=["yes", "no", "maybe"]), GuidedDecodingParams(regex=r"[0-9]{3}-[a-z]{2}"),
             GuidedDecodingParams(json=schema)]
    prompts = ["Answer:", "Code:", "JSON:", "free text"]
    params = [SamplingParams(temperature=0.0, max_tokens=80, guided_decoding=s) for s in specs]
    params.append(SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    # one token bucket: start-up compiles 2 step executables (full, greedy), not 4; the prompts (30 tokens) still
    # prefill in one step, and the decode steps run padded to 32 tokens
    llm = LLM(model, tokenizer=tok, max_model_len=160, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
              token_buckets=(32,), progress=False)
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    compiled = llm.engine.runner.num_compiled()  # LLM.generate compiled the variants its rows need, up front
    for out, prompt, spec in zip(outs, prompts, specs):
        guide = llm.engine.guide(spec)
        assert out.token_ids == masked_greedy(model, tok, prompt, guide, 80)
        assert out.finish_reason == "stop"
    assert outs[0].text in ("yes", "no", "maybe")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[1].text)
    obj = json.loads(outs[2].text)
    assert list(obj) in (["name", "n"], ["name", "n", "ok"]) and isinstance(obj["n"], int)
    assert isinstance(obj.get("ok", False), bool)
    free = ie_jax.generate(model, tok, [prompts[3]], params[3])[0].token_ids
    assert outs[3].token_ids == free  # a guided batch-mate changes nothing for the others
    # seeded sampling under a schema: valid JSON each time, and the slots' masks are cleared for free requests
    sampled = SamplingParams(temperature=1.0, max_tokens=60, guided_decoding=GuidedDecodingParams(json=schema))
    for i, o in enumerate(llm.generate(["a", "b", "c"], [sampled] * 3, use_tqdm=False)):
        assert {"name", "n"} <= set(json.loads(o.outputs[0].text)) <= {"name", "n", "ok"}
    again = llm.generate([prompts[3]] * 4, params[3], use_tqdm=False)
    assert all(o.outputs[0].token_ids == free for o in again)
    assert llm.engine.runner.num_compiled() == compiled  # the masks are per-slot data: no new executables
    with pytest.raises(ValueError, match="guided decoding"):
        ie_jax.generate(model, tok, ["x"], params[0])


def test_guided_request_survives_preemption(tiny):
    """A tiny page pool forces recomputation; the grammar state lives on the host, so outputs stay the same."""
    model, tok = tiny
    spec = GuidedDecodingParams(regex=r"(ab|cd){4,8}!")
    params = SamplingParams(temperature=0.0, max_tokens=30, guided_decoding=spec)
    small = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
                num_pages=10, progress=False)
    outs = small.generate(["x" * 30, "y" * 30, "z" * 30], params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for o, p in zip(outs, ["x" * 30, "y" * 30, "z" * 30]):
        assert o.outputs[0].token_ids == masked_greedy(model, tok, p, small.engine.guide(spec), 30)
        assert re.fullmatch(r"(ab|cd){4,8}!", o.outputs[0].text)


def test_sampler_applies_the_bitmask():
    from ie_jax.guided import pack_bits
    from ie_jax.sampling import SamplingTensors, sample
    rng = np.random.default_rng(0)
    B, V = 3, 70
    logits = rng.standard_normal((B, V)).astype(np.float32)
    allowed = rng.random((B, V)) < 0.2
    allowed[2] = True
    t = SamplingTensors.from_params([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=2),
                                     SamplingParams(temperature=0.0)], [[1]] * B, [[]] * B, V)
    t = t.replace(allowed_bits=jax.numpy.asarray(pack_bits(allowed)))
    for mode in ("sample", "draw", "auto"):
        ids = np.asarray(sample(jax.numpy.asarray(logits), t, 0, mode).token_ids)
        assert ids[0] == int(np.argmax(np.where(allowed[0], logits[0], -np.inf)))
        assert allowed[1, ids[1]] and ids[2] == int(np.argmax(logits[2]))


def test_allowed_token_ids_restrict_every_step_without_waiting(tiny):
    """vLLM's allowed_token_ids: a fixed mask, so the request decodes every step. A grammar alone does too: the
    engine reads each step back before the next one (see the next test for a grammar among plain requests)."""
    model, tok = tiny
    allowed = sorted({ord(c) for c in "abc "})
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed)
    llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, page_size=8,
              progress=False)
    engine = llm.engine
    for rid, p in (("fixed", params), ("grammar", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                   guided_decoding=GuidedDecodingParams(regex="[abc ]{12}")))):
        engine.add_request(rid, "Say:", p)
        steps, out = 0, []
        while engine.has_unfinished_requests():
            steps += 1
            out += [t for o in engine.step() for t in o.new_token_ids]
        assert len(out) == 12 and set(out) <= set(allowed)
        assert steps <= 14, (rid, steps)
    ids, want = tok.encode("Say:"), []
    for _ in range(12):
        logits = last_logits(model, ids + want)
        want.append(allowed[int(np.argmax(logits[allowed]))])
    assert llm.generate(["Say:"], params, use_tqdm=False)[0].outputs[0].token_ids == want
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("big", "x", SamplingParams(allowed_token_ids=[10**6]))


def test_grammar_rows_read_back_first_only_where_they_are_half_the_batch(tiny):
    """With one grammar request beside one plain request each step is read back before the next (both advance
    every step); beside three plain ones the grammar sits out every other step and the plain rows keep the
    overlap. Greedy outputs are the same either way."""
    model, tok = tiny
    regex = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                           guided_decoding=GuidedDecodingParams(regex="[a-z]{10}"))
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
              progress=False)
    engine = llm.engine
    prompts = ["Name:", "a", "bb", "ccc"]
    steps, tokens, beside = {}, {}, {}  # beside: the grammar's tokens when the last plain request finished
    for count in (2, 4):
        for i in range(count):
            engine.add_request(f"{count}-{i}", prompts[i], regex if i == 0 else plain)
        steps[count], tokens[count] = 0, {}
        while engine.has_unfinished_requests():
            steps[count] += 1
            for o in engine.step():
                tokens[count].setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finished and o.request_id != f"{count}-0":
                    beside[count] = len(tokens[count].get(f"{count}-0", []))
        assert all(len(t) == 10 for t in tokens[count].values()) and len(tokens[count]) == count
    assert steps[2] <= 12 and beside[2] >= 9, (steps, beside)  # in step with the plain row
    assert beside[4] <= 6 and steps[4] >= 15, (steps, beside)  # every other step while three plain rows ran
    assert tokens[2]["2-0"] == tokens[4]["4-0"] == masked_greedy(model, tok, "Name:", engine.guide(
        regex.guided_decoding), 10)
    for i in (1,):
        assert tokens[2][f"2-{i}"] == tokens[4][f"4-{i}"]
    assert re.fullmatch("[a-z]{10}", tok.decode(tokens[4]["4-0"]))


@pytest.mark.parametrize("pattern", [r"[ab]+", r"\{[ab]*\}", r"x?", r"<t[ab]"])
@pytest.mark.parametrize("opened", [True, False])
def test_grammar_after_a_thought_matches_python_re(pattern, opened):
    """after_thought: free text up to the first </think>, spaces, then the grammar; not `opened`, the reply enters
    the thought only by starting with <think> (a grammar that itself starts with '<' keeps its own texts)."""
    rng = np.random.default_rng(0)
    pieces = ["<think>", "</think>", "<", "</", "</th", "think", ">", "a", "b", " ", "\n", "{", "}", "x", "<t", "é"]
    dfa = after_thought(compile_regex(pattern), opened)
    thought = r"(?:(?!</think>).)*</think>[ \t\n\r]{0,4}"
    full = (thought if opened else r"(?:<think>" + thought + r"|[ \t\n\r]{0,4})") + "(?:" + pattern + ")"
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.integers(0, 7)))
        assert dfa.matches(text.encode()) == (re.fullmatch(full, text, re.S) is not None), text


def test_guide_after_a_thought_frees_every_token_until_the_block_closes():
    tok = ByteTokenizer()
    spec = GuidedDecodingParams(regex="[0-9]{2}", thought="open")
    guide = TokenGuide(spec.dfa(), token_bytes(tok, tok.vocab_size), tok.eos_token_ids)
    state = 0
    for ch in "I count: 4 < 5 </thin":  # in the thought: every byte, never EOS
        assert set(guide.allowed(state).tolist()) == set(range(256)), repr(ch)
        state = guide.advance(state, ord(ch))
    for ch in "k>\n":
        state = guide.advance(state, ord(ch))
    assert set(guide.allowed(state).tolist()) == set(range(ord("0"), ord("9") + 1)) | {ord(" "), ord("\t"),
                                                                                      ord("\n"), ord("\r")}
    for ch in "42":
        state = guide.advance(state, ord(ch))
    assert guide.complete(state)
    with pytest.raises(ValueError, match="thought"):
        GuidedDecodingParams(regex="a", thought="closed")


@pytest.mark.parametrize("pattern", ["a?a?a?", "x{0,5}", "(ab)*", "a*b?c{2}"])
def test_minimized_automaton_keeps_counts_apart(pattern):
    """Every state accepts here, yet the states still differ by how many more characters they take."""
    dfa = compile_regex(pattern)
    for n in range(9):
        for text in ("a" * n, "x" * n, "ab" * n, "a" * n + "cc", "a" * n + "bcc"):
            assert dfa.matches(text.encode()) == bool(re.fullmatch(pattern, text)), text


def test_states_past_the_eager_budget_are_computed_when_reached(monkeypatch):
    tok = ByteTokenizer()
    vocab = token_bytes(tok, tok.vocab_size)
    dfa = compile_regex(GuidedDecodingParams(json=SCHEMA).regex_pattern())
    full = TokenGuide(dfa, vocab, tok.eos_token_ids)
    monkeypatch.setattr(TokenGuide, "eager_states", 3)
    lazy = TokenGuide(dfa, vocab, tok.eos_token_ids)
    assert len(lazy.rows) < 70 < len(full.rows)
    text = json.dumps({"name": "ab", "age": 7, "score": 1.5, "tags": ["a"], "ok": True, "pet": None}).encode()
    s_full = s_lazy = 0
    for b in text:  # the byte tokenizer: one token a byte
        np.testing.assert_array_equal(lazy.mask(s_lazy), full.mask(s_full))
        s_full, s_lazy = full.advance(s_full, b), lazy.advance(s_lazy, b)
    assert s_full == s_lazy and dfa.accepting[s_lazy]
    assert all(np.array_equal(lazy.mask(s), full.mask(s)) for s in full.rows)


def test_min_tokens_gives_way_when_the_grammar_is_complete(tiny):
    """A choice is complete after a few tokens; min_tokens beyond that would ban the only token left (EOS). The
    engine lifts the ban for that row, so the text is the choice and the request stops, greedy and sampled."""
    model, tok = tiny
    llm = LLM(model, tokenizer=tok, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
              progress=False)
    spec = GuidedDecodingParams(choice=["yes", "no"])
    params = [SamplingParams(temperature=t, max_tokens=30, min_tokens=20, seed=1, guided_decoding=spec)
              for t in (0.0, 1.0)]
    for out in llm.generate(["Answer:", "Reply:"], params, use_tqdm=False):
        o = out.outputs[0]
        assert o.text in ("yes", "no") and o.finish_reason == "stop", (o.text, o.finish_reason)
    guide = llm.engine.guide(spec)
    state = 0
    for t in tok.encode("yes"):
        assert not guide.complete(state)
        state = guide.advance(state, t)
    assert guide.complete(state)
