"""vLLM's bad_words: the guide's bans against the rule itself on random outputs, the words' token ids as vLLM
derives them, and the engine's greedy output against a step-by-step reference that applies the rule to the dense
model's logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ie_jax
from engine.llm import LLM
from ie_jax import SamplingParams
from ie_jax.guided import BadWordsGuide, bad_word_ids


def banned_by_rule(words: list[list[int]], output: list[int]) -> set[int]:
    """vLLM's rule: a word's last token is banned where the output ends with the word's other tokens."""
    return {w[-1] for w in words if len(w) == 1 or output[-(len(w) - 1):] == w[:-1]}


def unpack(bits: np.ndarray, vocab: int) -> set[int]:
    v = np.arange(vocab)
    return set(np.flatnonzero(((bits[v // 32] >> (v % 32)) & 1) == 0).tolist())


def test_guide_bans_what_the_rule_bans_on_random_outputs():
    V = 12
    words = [[5], [1, 2], [1, 2, 3], [2, 3], [2, 2, 4], [7, 1, 1, 9]]
    guide = BadWordsGuide(words, V)
    assert not guide.static and BadWordsGuide([[3], [4]], V).static
    rng = np.random.default_rng(0)
    for _ in range(200):
        output, state = [], 0
        for _ in range(30):
            assert unpack(guide.mask(state), V) == banned_by_rule(words, output), output
            token = int(rng.choice([1, 2, 2, 3, 4, 7, 9, 0, 1]))  # tokens that make the words' prefixes often
            output.append(token)
            state = guide.advance(state, token)


class _Tok:
    """A word-level tokenizer where " w" is its own token (as BPE's word-initial tokens are)."""
    table = {"bad": [10], " bad": [11], "two words": [12, 13], " two words": [14, 13], "x y z": [1, 2, 3],
             " x y z": [0, 1, 2, 3]}

    def encode(self, text, add_special_tokens=True):
        return list(self.table[text])


def test_word_ids_follow_vllms_spaced_rule():
    assert bad_word_ids(_Tok(), ["bad", " two words", "x y z"]) == [[10], [11], [12, 13], [14, 13], [1, 2, 3]]


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["ok", ""])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(bad_words=["no"], allowed_token_ids=[1, 2])


@pytest.mark.parametrize("words", [["11"], ["1", "]("]])
def test_engine_greedy_with_bad_words_matches_the_reference(words):
    """The tiny model answers "dog 1" with "1" twelve times: "11" can then never follow a "1" (a guide that waits
    for each token), and "1" alone is banned everywhere (a static one)."""
    model, tok = ie_jax.load_model("tiny-llama", dtype="float32", seed=1)
    llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
              progress=False)
    prompt = tok.encode("dog 1")
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert out.text == "1" * 12
    ids = bad_word_ids(tok, words)
    assert ids == [tok.encode(w, add_special_tokens=False) for w in words]  # bytes: no spaced variants
    forward = jax.jit(lambda t: model(t)[0][0, -1])
    ref = []
    for _ in range(12):  # the reference: dense logits, the rule's bans, argmax
        logits = np.array(forward(jnp.asarray([prompt + ref], jnp.int32)))
        logits[list(banned_by_rule(ids, ref))] = -np.inf
        ref.append(int(np.argmax(logits)))
        if ref[-1] in llm.engine.eos_token_ids:
            break
    got = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, bad_words=words),
                       use_tqdm=False)[0].outputs[0]
    assert got.token_ids == ref and "11" not in got.text
    for w in ids:
        assert not any(got.token_ids[i:i + len(w)] == w for i in range(len(got.token_ids)))
    # the guide is built once per word list; a second request reuses it and gets the same tokens
    guide = llm.engine.bad_words_guide(tuple(words))
    assert llm.engine.bad_words_guide(tuple(words)) is guide and llm.engine.bad_words_guide(("other",)) is not guide
    again = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, bad_words=words),
                         use_tqdm=False)[0].outputs[0]
    assert again.token_ids == ref and llm.engine.bad_words_guide(tuple(words)) is guide
