"""Incremental detokenizer: the streamed pieces add up to `decode(all ids)`, and never hold half a character."""
import random

import pytest

import tokenizers
from fixtures.tokenizers.make_tokenizers import build_byte_level, build_sentencepiece, random_text
from ie_jax.detokenizer import IncrementalDetokenizer, StreamDetokenizer, WordDetokenizer, make_detokenizer
from ie_jax.tokenizer import ByteTokenizer, HFTokenizer, SyntheticTokenizer, load_tokenizer

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("detok")
    return {"byte": ByteTokenizer(), "llama3": load_tokenizer(build_byte_level(root / "llama3")),
            "chatml": load_tokenizer(build_byte_level(root / "chatml", style="chatml")),
            "llama2": load_tokenizer(build_sentencepiece(root / "llama2")),
            "synthetic": SyntheticTokenizer(300, bos_token_id=1, eos_token_ids=(2, 7))}


def _stream(tok, ids, prompt_ids=(), skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    chunks = [detok.add(i) for i in ids]
    return detok, chunks


@pytest.mark.parametrize("name", ["byte", "llama3", "chatml", "llama2"])
def test_stream_equals_full_decode(toks, name):
    tok = toks[name]
    rng = random.Random(0)
    specials = [i for i in (tok.bos_token_id, *tok.eos_token_ids) if i is not None]
    for _ in range(30):
        # A few segments of random text with special ids between them, as a model emits them.
        ids = tok.encode(random_text(rng, rng.randint(1, 30)), add_special_tokens=rng.random() < 0.5)
        for _ in range(rng.randint(0, 3)):
            ids += [rng.choice(specials)] + tok.encode(random_text(rng, rng.randint(0, 20)), add_special_tokens=False)
        for skip in (True, False):
            detok, chunks = _stream(tok, ids, skip_special_tokens=skip)
            expected = tok.decode(ids, skip_special_tokens=skip)
            assert FFFD not in expected
            assert "".join(chunks) == detok.text == expected
            assert not any(FFFD in c for c in chunks)
            assert detok.flush() == ""


@pytest.mark.parametrize("name", ["byte", "llama3", "llama2"])
def test_stream_after_prompt(toks, name):
    tok = toks[name]
    rng = random.Random(1)
    checked = 0
    for _ in range(40):
        ids = tok.encode(random_text(rng, rng.randint(2, 60)))
        split = rng.randint(1, len(ids) - 1)
        prompt_text = tok.decode(ids[:split])
        if prompt_text.endswith(FFFD):  # the prompt must end on a whole character
            continue
        detok, chunks = _stream(tok, ids[split:], prompt_ids=ids[:split])
        full = tok.decode(ids)
        assert full.startswith(prompt_text)
        assert "".join(chunks) == full[len(prompt_text):]
        assert not any(FFFD in c for c in chunks)
        checked += 1
    assert checked > 20


def test_multibyte_characters_wait_for_their_last_byte():
    tok = ByteTokenizer()
    text = "中文 é!"
    _, chunks = _stream(tok, tok.encode(text, add_special_tokens=False))
    # 中 and 文 are 3 bytes each, é is 2: the detokenizer waits for the last byte of each.
    assert chunks == ["", "", "中", "", "", "文", " ", "", "é", "!"]


def test_emoji_split_across_byte_fallback_tokens(toks):
    tok = toks["llama2"]
    ids = tok.encode("a 😀b", add_special_tokens=False)
    tokens = tok.convert_ids_to_tokens(ids)
    emoji_bytes = [f"<0x{b:02X}>" for b in "😀".encode()]
    start = tokens.index(emoji_bytes[0])
    assert tokens[start:start + 4] == emoji_bytes
    _, chunks = _stream(tok, ids)
    assert chunks[start:start + 4] == ["", "", "", "😀"]
    assert "".join(chunks) == "a 😀b"


def test_leading_space_markers(toks):
    # ▁ (sentencepiece) and Ġ (byte-level) are spaces; a decoder drops ▁ only at the very start of the text.
    llama2, llama3 = toks["llama2"], toks["llama3"]
    prompt = llama2.encode("the fox")
    world = llama2.encode(" the", add_special_tokens=False)
    assert llama2.convert_ids_to_tokens(world)[0].startswith("▁")
    assert "".join(_stream(llama2, world, prompt_ids=prompt)[1]) == " the"
    assert "".join(_stream(llama2, world)[1]) == llama2.decode(world) == "the"
    with_bos = [llama2.bos_token_id] + world
    assert "".join(_stream(llama2, with_bos)[1]) == "the"

    fox = llama3.encode(" fox", add_special_tokens=False)
    assert llama3.convert_ids_to_tokens(fox)[0].startswith("Ġ")
    assert "".join(_stream(llama3, fox)[1]) == " fox"
    assert "".join(_stream(llama3, fox, prompt_ids=llama3.encode("the"))[1]) == " fox"


def test_special_tokens_in_stream(toks):
    tok = toks["llama3"]
    eot = tok.encode("<|eot_id|>", add_special_tokens=False)
    ids = tok.encode("hi", add_special_tokens=False) + eot
    assert "".join(_stream(tok, ids)[1]) == "hi"
    assert "".join(_stream(tok, ids, skip_special_tokens=False)[1]) == "hi<|eot_id|>"


def test_flush_releases_an_unfinished_character():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in "ab中".encode()[:4]] == ["a", "b", "", ""]
    assert detok.flush() == b"\xe4\xb8".decode("utf-8", errors="replace")
    assert detok.text == "ab" + FFFD
    assert detok.flush() == ""


def test_invalid_bytes_are_emitted_once_followed():
    # A lone continuation byte stays invalid forever: it is held only until the next character arrives.
    tok = ByteTokenizer()
    ids = [104, 0xB8, 105, 0xFF, 0xE4, 0xB8, 0xAD]
    detok, chunks = _stream(tok, ids)
    assert "".join(chunks) == bytes(ids).decode("utf-8", errors="replace")
    assert chunks[1] == "" and chunks[3] == "" and chunks[4] == "" and chunks[5] == ""


class _CountingTokenizer:
    """Wraps a tokenizer and records the longest id list each decode received."""

    def __init__(self, inner):
        self.inner, self.longest, self.calls = inner, 0, 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest, self.calls = max(self.longest, len(ids)), self.calls + 1
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_window_stays_short(toks):
    rng = random.Random(2)
    for name in ("byte", "llama2"):
        tok = toks[name]
        ids = tok.encode(random_text(rng, 1500))
        counting = _CountingTokenizer(tok)
        detok, _ = _stream(counting, ids[300:], prompt_ids=ids[:300])
        assert detok.text == tok.decode(ids)[len(tok.decode(ids[:300])):]
        assert counting.longest <= 16  # a few tokens of context plus the longest character (emoji + joiners)
        assert counting.calls <= 2 * len(ids)


# make_detokenizer's fast detokenizers must give IncrementalDetokenizer's output at every add() and at flush().

FAST = {"llama3": StreamDetokenizer, "chatml": StreamDetokenizer, "llama2": StreamDetokenizer,
        "synthetic": WordDetokenizer}


def _assert_same_stream(tok, ids, prompt_ids=(), skip_special_tokens=True):
    ref = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens)
    fast = make_detokenizer(tok, prompt_ids, skip_special_tokens)
    chunks = []
    for k, i in enumerate(ids):
        chunks.append(fast.add(i))
        assert chunks[-1] == ref.add(i), f"add #{k} of {ids[:k + 1]} after prompt {list(prompt_ids)}"
    chunks.append(fast.flush())
    assert chunks[-1] == ref.flush()
    assert "".join(chunks) == fast.text == ref.text


def _awkward_ids(tok):
    """Ids that exercise the detokenizers' corner cases: specials, single bytes, and pieces that are only spaces."""
    ids = [i for i in range(min(tok.vocab_size, 300)) if tok.is_special(i) or i < 260]
    if isinstance(tok, HFTokenizer):
        ids += [i for i, t in enumerate(tok.convert_ids_to_tokens(range(tok.vocab_size))) if t in ("▁", "Ġ", "<0x20>")]
    return ids


@pytest.mark.parametrize("name", list(FAST))
def test_fast_detokenizer_type(toks, name):
    assert type(make_detokenizer(toks[name], [1, 2])) is FAST[name]


@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("skip", [True, False])
def test_fast_matches_reference_on_random_ids(toks, name, skip):
    tok = toks[name]
    awkward = _awkward_ids(tok)
    for seed in range(100):
        rng = random.Random(seed)
        draw = (lambda: rng.randrange(tok.vocab_size)) if seed % 2 else (lambda: rng.choice(awkward))
        for prompt_len in (0, 1, 12):
            prompt = [draw() for _ in range(prompt_len)]
            _assert_same_stream(tok, [draw() for _ in range(60)], prompt, skip)


@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("skip", [True, False])
def test_fast_matches_reference_on_text(toks, name, skip):
    tok = toks[name]
    rng = random.Random(3)
    specials = [i for i in (tok.bos_token_id, *tok.eos_token_ids) if i is not None]
    texts = ["中文 😀 b", "a 👍🏽 👨‍👩‍👧 ❤️ 龍鳳 é", "😀😀中", "\n\n  中"] + [random_text(rng, 25) for _ in range(10)]
    for text in texts:
        ids = tok.encode(text)
        if rng.random() < 0.5:
            ids.insert(rng.randint(0, len(ids)), rng.choice(specials))
        # Every split point, including ones inside a character: the prompt may end mid-character.
        for split in range(len(ids) + 1):
            _assert_same_stream(tok, ids[split:], ids[:split], skip)


def test_fast_matches_reference_where_the_stream_alone_would_differ(toks):
    # Byte-fallback sequences where a lone DecodeStream parts from the reference; StreamDetokenizer must not.
    tok = toks["llama2"]
    vocab = {t: i for i, t in enumerate(tok.convert_ids_to_tokens(range(tok.vocab_size)))}
    space, a = vocab["▁"], vocab["a"]

    def byte(b):
        return 3 + b  # <0x00>..<0xFF> are ids 3..258

    emoji = [byte(b) for b in "😀".encode()]
    cases = [
        ([], [space, byte(0x20), byte(0xE4), a]),          # empty prefix text, then ids whose text is empty
        (emoji[:2], emoji[2:] + [a]),                      # prompt ending mid-character
        ([a], emoji + [byte(0xE4), a, a]),                 # a later byte makes a finished byte run invalid
    ]
    for prompt, ids in cases:
        for skip in (True, False):
            _assert_same_stream(tok, ids, prompt, skip)


@pytest.mark.parametrize("name", list(FAST) + ["byte"])
def test_out_of_vocabulary_id_raises(toks, name):
    tok = toks[name]
    for bad in (tok.vocab_size, -1):
        with pytest.raises(ValueError) as decode_error:
            tok.decode([bad])
        detok = make_detokenizer(tok, [1])
        detok.add(3)
        with pytest.raises(ValueError) as add_error:
            detok.add(bad)
        message = f"token id {bad} is outside the vocabulary [0, {tok.vocab_size})"
        assert str(add_error.value) == str(decode_error.value) == message


class _DecodeOnly:
    def __init__(self, inner):
        self.inner = inner

    def decode(self, ids, skip_special_tokens=True):
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_reference_for_tokenizers_without_a_fast_detokenizer(toks, tmp_path):
    assert type(make_detokenizer(_DecodeOnly(toks["llama3"]), [1])) is IncrementalDetokenizer
    assert type(make_detokenizer(toks["byte"], [1])) is IncrementalDetokenizer
    # A decoder that is not known to keep DecodeStream exact (CTC drops repeats across tokens) gets the reference.
    backend = tokenizers.Tokenizer.from_file(str(build_byte_level(tmp_path / "ctc") / "tokenizer.json"))
    backend.decoder = tokenizers.decoders.CTC()
    assert type(make_detokenizer(HFTokenizer(backend), [1])) is IncrementalDetokenizer
