"""Tokenizers: HF special-token rules (BOS/EOS/pad), round trips, chat templates, ByteTokenizer <-> HF directory.

The references are the raw `tokenizers` library on the same tokenizer.json, the JSON files themselves, and
Python's own UTF-8 codec; the expected BOS/EOS placements are those transformers produces for each style.
"""
import json
import random
import shutil

import numpy as np
import pytest
import tokenizers

from fixtures.tokenizers.make_tokenizers import build_byte_level, build_sentencepiece, random_text
from ie_jax.tokenizer import BYTE_SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "llama3": build_byte_level(root / "llama3"),
        "chatml": build_byte_level(root / "chatml", style="chatml"),
        "llama2": build_sentencepiece(root / "llama2"),
        "llama2_pp": build_sentencepiece(root / "llama2_pp", post_processor_bos=True),
        "llama2_pp_no_bos": build_sentencepiece(root / "llama2_pp_no_bos", post_processor_bos=True,
                                                add_bos_token=False),
        "llama2_eos": build_sentencepiece(root / "llama2_eos", add_eos_token=True),
        "spm_no_flags": build_sentencepiece(root / "spm_no_flags", add_bos_token=None, add_eos_token=None),
        "spm_generic": build_sentencepiece(root / "spm_generic", add_bos_token=None, add_eos_token=None,
                                           tokenizer_class="PreTrainedTokenizerFast"),
        "byte": _saved_byte_tokenizer(root / "byte"),
    }


def _saved_byte_tokenizer(path):
    ByteTokenizer().save_pretrained(path)
    return path


def _raw(path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))


def _texts(seed: int, n: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng, rng.randint(1, 40)) for _ in range(n)]


# (fixture, BOS first?, EOS last?) as transformers' tokenizer(text)["input_ids"] has them. A LlamaTokenizer with
# no add_*_token flags still adds BOS (the class default); a generic fast tokenizer follows its post-processor.
SPECIAL_PLACEMENT = [("llama3", True, False), ("chatml", False, False), ("llama2", True, False),
                     ("llama2_pp", True, False), ("llama2_pp_no_bos", False, False), ("llama2_eos", True, True),
                     ("spm_no_flags", True, False), ("spm_generic", False, False), ("byte", True, False)]


@pytest.mark.parametrize("name,bos_first,eos_last", SPECIAL_PLACEMENT)
def test_encode_special_tokens_follow_hf(dirs, name, bos_first, eos_last):
    tok = load_tokenizer(dirs[name])
    raw = _raw(dirs[name])
    config = json.loads((dirs[name] / "tokenizer_config.json").read_text())
    bos_id = raw.token_to_id(config["bos_token"]["content"] if isinstance(config["bos_token"], dict)
                             else config["bos_token"]) if config.get("bos_token") else None
    eos_id = raw.token_to_id(config["eos_token"]["content"] if isinstance(config["eos_token"], dict)
                             else config["eos_token"])
    assert tok.bos_token_id == bos_id
    for text in _texts(seed=1, n=10) + [""]:
        body = raw.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == body
        expected = [bos_id] * bos_first + body + [eos_id] * eos_last
        assert tok.encode(text) == expected, text


def test_bos_eos_pad_and_generation_eos(dirs):
    llama3 = load_tokenizer(dirs["llama3"])
    raw = _raw(dirs["llama3"])
    eot, end = raw.token_to_id("<|eot_id|>"), raw.token_to_id("<|end_of_text|>")
    assert (llama3.bos_token, llama3.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert llama3.eos_token_ids == (eot, end)  # tokenizer EOS first, then generation_config's list, no repeats
    assert llama3.pad_token_id is None

    chatml = load_tokenizer(dirs["chatml"])
    raw = _raw(dirs["chatml"])
    assert chatml.bos_token_id is None and chatml.bos_token is None
    assert chatml.eos_token_ids == (raw.token_to_id("<|im_end|>"), raw.token_to_id("<|endoftext|>"))
    assert chatml.pad_token_id == raw.token_to_id("<|endoftext|>")

    llama2 = load_tokenizer(dirs["llama2"])  # bos/eos given as AddedToken dicts, generation eos as one int
    assert (llama2.bos_token_id, llama2.eos_token_ids, llama2.unk_token) == (1, (2,), "<unk>")


def test_vocab_size_and_tokens_match_the_json(dirs):
    for name in ("llama3", "chatml", "llama2", "byte"):
        data = json.loads((dirs[name] / "tokenizer.json").read_text())
        id_to_token = {i: t for t, i in data["model"]["vocab"].items()}
        id_to_token.update({t["id"]: t["content"] for t in data["added_tokens"]})
        tok = load_tokenizer(dirs[name])
        assert tok.vocab_size == max(id_to_token) + 1
        ids = random.Random(2).sample(range(tok.vocab_size), 50)
        assert tok.convert_ids_to_tokens(ids) == [id_to_token[i] for i in ids]
        expected_special = {t["id"] for t in data["added_tokens"] if t["special"]}
        assert {i for i in range(tok.vocab_size) if tok.is_special(i)} == expected_special


def test_non_special_added_token(dirs):
    tok = load_tokenizer(dirs["chatml"])
    call = tok.encode("<tool_call>", add_special_tokens=False)
    assert len(call) == 1 and not tok.is_special(call[0])
    ids = tok.encode("<|im_start|>hi<tool_call><|im_end|>")
    assert tok.decode(ids) == "hi<tool_call>"  # specials skipped, plain added tokens kept
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<tool_call><|im_end|>"


@pytest.mark.parametrize("name", ["llama3", "chatml", "llama2", "byte"])
def test_round_trip_random_texts(dirs, name):
    tok = load_tokenizer(dirs[name])
    raw = _raw(dirs[name])
    for text in _texts(seed=3):
        ids = tok.encode(text)
        assert tok.decode(ids) == raw.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == raw.decode(ids, skip_special_tokens=False)
        if name != "llama2":  # byte-level tokenizers are lossless
            assert tok.decode(ids) == text
        elif not text.startswith((" ", "\t", "\n")):  # sentencepiece style drops nothing else
            assert tok.decode(ids) == text
    assert tok.decode(np.array(tok.encode("numpy ids"))) == "numpy ids"


def test_decode_rejects_out_of_range_ids(dirs):
    for tok in (load_tokenizer(dirs["llama3"]), ByteTokenizer()):
        with pytest.raises(ValueError, match=str(tok.vocab_size)):
            tok.decode([5, tok.vocab_size])
        with pytest.raises(ValueError, match="-1"):
            tok.decode([-1])
        with pytest.raises(ValueError):
            tok.convert_ids_to_tokens([tok.vocab_size + 7])


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_chat_template_sources(dirs, tmp_path):
    path = tmp_path / "tok"
    shutil.copytree(dirs["llama2"], path)
    no_template = load_tokenizer(path)
    assert no_template.chat_template is None
    with pytest.raises(ValueError, match="no chat template.*chat_template="):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    explicit = "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert no_template.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=explicit) == "<s>[hi]"

    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ eos_token }}"},
                               {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    named = load_tokenizer(path)
    assert named.apply_chat_template([]) == "D</s>"
    assert named.apply_chat_template([], tools=[{"name": "f"}]) == "T1"

    (path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert load_tokenizer(path).apply_chat_template([{"role": "user", "content": "x"}]) == "J1"


def test_apply_chat_template_tokenize_has_one_bos(dirs):
    tok = load_tokenizer(dirs["llama3"])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
                         "\n\n{{ m.content }}<|eot_id|>{% endfor %}")
    messages = [{"role": "user", "content": "Bonjour, ça va? 你好"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    assert ids == _raw(dirs["llama3"]).encode(text, add_special_tokens=False).ids
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=False) == text


# ---------------------------------------------------------------------------------------------------------------
# ByteTokenizer


def test_byte_tokenizer_encode_decode():
    tok = ByteTokenizer()
    assert tok.vocab_size == 263 and (tok.pad_token_id, tok.bos_token_id) == (256, 257)
    assert tok.eos_token_ids == (258, 262)
    for text in _texts(seed=4):
        assert tok.encode(text) == [257] + list(text.encode("utf-8"))
        assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a<|user|>é<|end|>")
    assert ids == [257, 97, 259, 0xC3, 0xA9, 262]
    assert tok.decode(ids) == "aé"
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>a<|user|>é<|end|>"
    assert [tok.is_special(i) for i in (0, 255, 256, 262)] == [False, False, True, True]


def test_byte_tokenizer_decodes_invalid_utf8_like_python():
    tok = ByteTokenizer()
    rng = np.random.default_rng(5)
    for _ in range(20):
        ids = rng.integers(0, 256, size=rng.integers(1, 30)).tolist()
        assert tok.decode(ids) == bytes(ids).decode("utf-8", errors="replace")


def test_byte_tokenizer_chat_template():
    tok = ByteTokenizer()
    messages = [{"role": "system", "content": "sé"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "<|bos|><|system|>sé<|end|><|user|>hi<|end|><|assistant|>"
    assert tok.apply_chat_template(messages, tokenize=True) == (
        [257, 261] + list("sé".encode()) + [262, 259] + list(b"hi") + [262, 260])
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_byte_tokenizer_save_and_reload_is_identical(dirs):
    byte, hf = ByteTokenizer(), load_tokenizer(dirs["byte"])
    assert isinstance(hf, HFTokenizer)
    assert (hf.vocab_size, hf.bos_token_id, hf.eos_token_ids, hf.pad_token_id) == (
        byte.vocab_size, byte.bos_token_id, byte.eos_token_ids, byte.pad_token_id)
    assert hf.chat_template == byte.chat_template
    specials = "".join(BYTE_SPECIAL_TOKENS)
    texts = _texts(seed=6) + [specials, "x" + specials[3:20] + "y"]
    for text in texts:
        for add in (True, False):
            assert hf.encode(text, add_special_tokens=add) == byte.encode(text, add_special_tokens=add)
    rng = np.random.default_rng(7)
    for _ in range(30):  # arbitrary id streams, invalid UTF-8 and specials included
        ids = rng.integers(0, byte.vocab_size, size=rng.integers(1, 40)).tolist()
        for skip in (True, False):
            assert hf.decode(ids, skip_special_tokens=skip) == byte.decode(ids, skip_special_tokens=skip)
        assert hf.convert_ids_to_tokens(ids) == byte.convert_ids_to_tokens(ids)
    assert [hf.is_special(i) for i in range(263)] == [byte.is_special(i) for i in range(263)]
    messages = [{"role": "user", "content": "Quel temps fait-il? 🌧"}]
    assert hf.apply_chat_template(messages, tokenize=True) == byte.apply_chat_template(messages, tokenize=True)


def test_save_pretrained_keeps_other_generation_fields(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "eos_token_id": 1}))
    ByteTokenizer().save_pretrained(tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"temperature": 0.6, "eos_token_id": [258, 262], "bos_token_id": 257, "pad_token_id": 256}
