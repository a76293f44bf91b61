"""The stand-in tokenizer of presets without tokenizer files: every id has text, and text round-trips to ids."""
import numpy as np

import ie_jax
from ie_jax.detokenizer import IncrementalDetokenizer
from ie_jax.tokenizer import SyntheticTokenizer


def test_ids_round_trip_and_stream():
    tok = SyntheticTokenizer(5000, bos_token_id=1, eos_token_ids=(2,))
    ids = np.random.default_rng(0).integers(3, 5000, 50).tolist()
    text = tok.decode(ids)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.encode(text)[0] == 1
    detok = IncrementalDetokenizer(tok, [1, 7])
    pieces = [detok.add(i) for i in ids]
    assert all(pieces) and "".join(pieces) == text
    other = tok.encode("hello world", add_special_tokens=False)
    assert other == tok.encode("hello world", add_special_tokens=False) and all(0 <= i < 5000 for i in other)


def test_real_architecture_presets_get_one(monkeypatch):
    import dataclasses
    from ie_jax import presets
    tiny = dataclasses.replace(presets.PRESETS["tiny-llama"], vocab_size=1000, bos_token_id=1, eos_token_id=(2,))
    monkeypatch.setitem(presets.PRESETS, "tiny-non-byte", tiny)
    model, tok = ie_jax.load_model("tiny-non-byte", load_format="dummy")
    assert isinstance(tok, SyntheticTokenizer) and tok.vocab_size == 1000 and tok.eos_token_ids == (2,)
    out = ie_jax.generate(model, tok, "w5 w6", ie_jax.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert out[0].text == tok.decode(out[0].token_ids) and len(out[0].token_ids) == 4
