"""The offline `LLM`'s vLLM prompt forms: {"prompt"} / {"prompt_token_ids"} dicts in `generate`, and `chat`, which
renders with the tokenizer's chat template and then equals generate on the rendered ids, token for token."""
from __future__ import annotations

import pytest

import ie_jax
from engine.llm import LLM
from ie_jax import SamplingParams
from ie_jax.tokenizer import ByteTokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
OTHER = [{"role": "user", "content": "0123456789"}]


@pytest.fixture(scope="module")
def tiny():
    model, tok = ie_jax.load_model("tiny-llama", dtype="float32", seed=1)
    assert isinstance(tok, ByteTokenizer) and tok.chat_template is not None
    return model, tok


@pytest.fixture(scope="module")
def llm(tiny):
    model, tok = tiny
    return LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
               progress=False)


def reference(tiny, prompts, params=GREEDY):
    model, tok = tiny
    return [o.token_ids for o in ie_jax.generate(model, tok, prompts, params)]


def test_prompt_dicts_equal_the_reference(tiny, llm):
    _, tok = tiny
    ids = [tok.BOS, 72, 105, 33]
    outs = llm.generate([{"prompt": "Hello there"}, {"prompt_token_ids": tok.encode("The quick brown fox")}, "r", ids],
                        GREEDY, use_tqdm=False)
    want = reference(tiny, ["Hello there", tok.encode("The quick brown fox"), "r", ids])
    assert [o.outputs[0].token_ids for o in outs] == want
    assert [o.prompt for o in outs] == ["Hello there", None, "r", None]
    assert [o.prompt_token_ids for o in outs] == [tok.encode("Hello there"), tok.encode("The quick brown fox"),
                                                  tok.encode("r"), ids]
    # one dict alone is one prompt, as one string is
    one, = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    assert (one.prompt, one.prompt_token_ids, one.outputs[0].token_ids) == (None, ids, want[3])


@pytest.mark.parametrize("prompt, match", [
    ({}, "exactly one of 'prompt' and 'prompt_token_ids'"),
    ({"prompt": "a", "prompt_token_ids": [1]}, "exactly one of 'prompt' and 'prompt_token_ids'"),
    ({"prompt": "a", "multi_modal_data": {"image": None}}, "prompt key 'multi_modal_data' is not supported"),
    ({"prompt_token_ids": [1], "cache_salt": "x"}, "prompt key 'cache_salt' is not supported"),
    ({"prompt": [1, 2]}, "prompt key 'prompt' must be a str"),
    ({"prompt_token_ids": "12"}, "prompt key 'prompt_token_ids' must be a list of ints"),
])
def test_bad_prompt_dicts_raise_naming_the_key(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine", prompt], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # checked before any request was added


def test_chat_equals_generate_on_the_rendered_template(tiny, llm):
    _, tok = tiny
    assert llm.get_tokenizer() is llm.tokenizer and llm.llm_engine is llm.engine  # vLLM's accessors
    ids = llm.get_tokenizer().apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert ids == tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    out, = llm.chat(CHAT, GREEDY, use_tqdm=False)
    assert out.prompt_token_ids == ids
    assert out.prompt == "<|bos|><|system|>Be brief.<|end|><|user|>Hello there<|end|><|assistant|>"
    assert out.outputs[0].token_ids == reference(tiny, [ids])[0]
    # a list of conversations gives one output each, in order
    other = tok.apply_chat_template(OTHER, add_generation_prompt=True, tokenize=True)
    outs = llm.chat([OTHER, CHAT], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [other, ids]
    assert [o.outputs[0].token_ids for o in outs] == reference(tiny, [other, ids])
    # text content parts are joined into the string they spell
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " the"},
                                                   {"type": "text", "text": "re"}]}]
    joined, = llm.chat(parts, GREEDY, use_tqdm=False)
    assert (joined.prompt_token_ids, joined.outputs[0].token_ids) == (ids, out.outputs[0].token_ids)


def test_chat_template_override_kwargs_and_continuation(tiny, llm):
    _, tok = tiny
    template = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}[{{ flavor }}]"
    out, = llm.chat(OTHER, GREEDY, use_tqdm=False, chat_template=template, chat_template_kwargs={"flavor": "salty"})
    assert out.prompt == "<|bos|><user>0123456789[salty]"
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)
    assert out.prompt_token_ids[:2] == [tok.BOS, ord("<")]  # the template's BOS, no second one
    assert out.outputs[0].token_ids == reference(tiny, [out.prompt_token_ids])[0]
    # chat_template_kwargs may override the named arguments, as in vLLM
    bare, = llm.chat(OTHER, GREEDY, use_tqdm=False, chat_template_kwargs={"add_generation_prompt": False})
    assert bare.prompt == "<|bos|><|user|>0123456789<|end|>"
    # continue_final_message extends the assistant's message: its end of turn is cut, its trailing space kept
    started = [*OTHER, {"role": "assistant", "content": "Sure, "}]
    cont, = llm.chat(started, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    assert cont.prompt == "<|bos|><|user|>0123456789<|end|><|assistant|>Sure, "
    assert cont.prompt_token_ids == tok.encode(cont.prompt, add_special_tokens=False)
    assert cont.outputs[0].token_ids == reference(tiny, [cont.prompt_token_ids])[0]


def test_chat_errors(llm, monkeypatch):
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(ValueError, match="content part .*'image_url'.* is not supported: only type 'text'"):
        llm.chat([image], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="continue_final_message=True .* pass add_generation_prompt=False"):
        llm.chat(OTHER, GREEDY, use_tqdm=False, continue_final_message=True)
    with pytest.raises(ValueError, match="nothing to continue"):
        llm.chat([*OTHER, {"role": "assistant", "content": ""}], GREEDY, use_tqdm=False,
                 add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ValueError, match="messages cannot be empty"):
        llm.chat([], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="must be a dict with 'role' and 'content'"):
        llm.chat([{"content": "no role"}], GREEDY, use_tqdm=False)
    untemplated = ByteTokenizer()
    untemplated.chat_template = None
    monkeypatch.setattr(llm, "tokenizer", untemplated)
    with pytest.raises(ValueError, match="this tokenizer has no chat template"):
        llm.chat(OTHER, GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
