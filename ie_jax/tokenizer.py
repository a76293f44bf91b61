"""Tokenizers: text <-> token ids, with Hugging Face semantics.

`HFTokenizer` loads a checkpoint directory (tokenizer.json through the `tokenizers` library, plus
tokenizer_config.json, special_tokens_map.json, generation_config.json and chat_template.jinja) and encodes,
decodes and applies chat templates exactly as transformers' fast tokenizer does. `ByteTokenizer` is a tiny
stand-alone tokenizer for tests and toy models: ids 0..255 are raw bytes, 256..262 are specials, and it can write
itself out as an HF directory that `HFTokenizer` reads back to the same behaviour.

BOS/EOS rule (what transformers does): the tokenizer.json post-processor adds special tokens where it has one
(Llama-3 style). An explicit `add_bos_token` / `add_eos_token` in tokenizer_config.json overrides it (Llama-2,
Mistral, Gemma style; Llama/Gemma tokenizer classes default it to BOS only): the token is added when the
post-processor did not add it, and removed when the flag is false and the post-processor did.

This module deliberately does not apply transformers' `clean_up_tokenization_spaces` in `decode` (" ." -> "."):
streaming engines emit raw text, and that clean-up is not stable under appending tokens. It knows nothing of
stop strings, model configs or the embedding size (which may exceed `vocab_size`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from ie_jax.chat_template import parse_chat_templates, render_chat_template, select_chat_template


def _content(token: Any) -> str | None:
    """A special token as tokenizer_config writes it: a plain string or an AddedToken dict {"content": ...}."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, Mapping) and isinstance(token.get("content"), str):
        return token["content"]
    raise ValueError(f"special token {token!r} must be a string or a dict with 'content'")


def _as_id_list(value: Any) -> list[int]:
    """generation_config ids may be absent, one int, or a list of ints."""
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"token id {value!r} must be an int or a list of ints")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def vocabulary_error(token_id: int, vocab_size: int) -> ValueError:
    """The error for an id outside [0, vocab_size): one message wherever ids are checked."""
    return ValueError(f"token id {token_id} is outside the vocabulary [0, {vocab_size})")


# Tokenizer classes whose transformers implementation adds BOS (and not EOS) unless tokenizer_config says otherwise.
_BOS_BY_DEFAULT_CLASSES = frozenset(
    f"{name}Tokenizer{fast}" for name in ("Llama", "CodeLlama", "Gemma") for fast in ("", "Fast"))


class Tokenizer:
    """What the engine, server and trainers rely on; `HFTokenizer` and `ByteTokenizer` implement it."""

    vocab_size: int                     # size of the id space: max id + 1
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]      # every id that ends generation
    pad_token_id: int | None
    bos_token: str | None = None
    eos_token: str | None = None        # the tokenizer's own EOS string (chat templates use it)
    pad_token: str | None = None
    unk_token: str | None = None
    chat_templates: dict[str, str] = {}  # named templates; "default" is `chat_template`

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self.chat_templates = {k: v for k, v in self.chat_templates.items() if k != "default"}
        if template is not None:
            self.chat_templates["default"] = template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        raise NotImplementedError

    def is_special(self, token_id: int) -> bool:
        raise NotImplementedError

    def incremental_detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        """A detokenizer for one request's generated ids (see `ie_jax.detokenizer`); subclasses return faster ones
        with the same output."""
        from ie_jax.detokenizer import IncrementalDetokenizer  # the detokenizer module imports this one
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render `messages` with the checkpoint's template (or `chat_template=` a name or a template string).

        The rendered text already holds BOS where the template wants it, so tokenize=True encodes it without
        adding special tokens again.
        """
        template = select_chat_template(self.chat_templates, kwargs.pop("chat_template", None),
                                        has_tools=bool(kwargs.get("tools")))
        variables = {"pad_token": self.pad_token or "", "unk_token": self.unk_token or "", **kwargs}
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @staticmethod
    def from_pretrained(path: str | os.PathLike) -> "Tokenizer":
        return load_tokenizer(path)

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise vocabulary_error(next(i for i in ids if not 0 <= i < self.vocab_size), self.vocab_size)
        return ids


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (tokenizer.json) with the checkpoint's special-token and template settings."""

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None,
                 generation_config: Mapping[str, Any] | None = None,
                 special_tokens_map: Mapping[str, Any] | None = None,
                 chat_templates: Mapping[str, str] | None = None):
        config, generation_config = dict(config or {}), dict(generation_config or {})
        special_tokens_map = dict(special_tokens_map or {})
        # Checkpoints sometimes ship padding/truncation inside tokenizer.json; transformers turns them off unless
        # a call asks for them, and so do we.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend

        def special(name: str) -> str | None:
            # An explicit null in tokenizer_config (Qwen's bos_token) wins over special_tokens_map.
            return _content(config[name] if name in config else special_tokens_map.get(name))

        self.bos_token, self.eos_token = special("bos_token"), special("eos_token")
        self.pad_token, self.unk_token = special("pad_token"), special("unk_token")
        self.bos_token_id = self._token_id(self.bos_token)
        self._eos_token_id = eos_token_id = self._token_id(self.eos_token)
        self.pad_token_id = self._token_id(self.pad_token)
        if self.pad_token_id is None:
            self.pad_token_id = (_as_id_list(generation_config.get("pad_token_id")) or [None])[0]

        eos = ([eos_token_id] if eos_token_id is not None else []) + _as_id_list(generation_config.get("eos_token_id"))
        self.eos_token_ids = tuple(dict.fromkeys(eos))

        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        added = backend.get_added_tokens_decoder()
        named = (self.bos_token_id, eos_token_id, self.pad_token_id, self._token_id(self.unk_token))
        self._special_ids = frozenset([i for i, t in added.items() if t.special] + [i for i in named if i is not None])

        if chat_templates is None:
            chat_templates = parse_chat_templates(config.get("chat_template"))
        self.chat_templates = dict(chat_templates)
        self._init_special_token_rule(config)
        self._decode_stream_exact: bool | None = None  # whether StreamDetokenizer supports the decoder; set when needed

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def _init_special_token_rule(self, config: Mapping[str, Any]) -> None:
        # Probe what the post-processor does on its own, then reconcile with explicit add_bos/eos_token flags.
        with_specials = self._backend.encode("a", add_special_tokens=True).ids
        without = self._backend.encode("a", add_special_tokens=False).ids
        bos, eos = self.bos_token_id, self._eos_token_id
        post_adds_bos = bos is not None and with_specials[:1] == [bos] and without[:1] != [bos]
        post_adds_eos = eos is not None and with_specials[-1:] == [eos] and without[-1:] != [eos]
        # Llama/Gemma tokenizer classes rebuild the post-processor from these flags and default them to BOS only.
        class_defaults = (True, False) if config.get("tokenizer_class") in _BOS_BY_DEFAULT_CLASSES else (None, None)
        add_bos = config.get("add_bos_token", class_defaults[0])
        add_eos = config.get("add_eos_token", class_defaults[1])
        self._prepend_bos = bool(add_bos) and bos is not None and not post_adds_bos
        self._strip_bos = add_bos is False and post_adds_bos
        self._append_eos = bool(add_eos) and eos is not None and not post_adds_eos
        self._strip_eos = add_eos is False and post_adds_eos
        self._adjust = self._prepend_bos or self._strip_bos or self._append_eos or self._strip_eos

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        path = Path(path)
        if path.is_file() and path.name == "tokenizer.json":
            path = path.parent
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found: ie-jax reads the fast-tokenizer file tokenizer.json (a checkpoint that "
                f"only has tokenizer.model can be converted once with transformers' AutoTokenizer.save_pretrained)")
        config = _read_json(path / "tokenizer_config.json")
        templates = parse_chat_templates(config.get("chat_template"))
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():  # newer checkpoints keep the default template here; it wins over the config copy
            templates["default"] = jinja_file.read_text(encoding="utf-8")
        return cls(tokenizers.Tokenizer.from_file(str(tokenizer_file)), config,
                   generation_config=_read_json(path / "generation_config.json"),
                   special_tokens_map=_read_json(path / "special_tokens_map.json"), chat_templates=templates)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._adjust:
            if self._strip_bos and ids[:1] == [self.bos_token_id]:
                del ids[0]
            if self._strip_eos and ids[-1:] == [self._eos_token_id]:
                del ids[-1]
            if self._prepend_bos:
                ids.insert(0, self.bos_token_id)
            if self._append_eos:
                ids.append(self._eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._backend.id_to_token(i) for i in self._checked_ids(ids)]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def incremental_detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        """A `tokenizers` DecodeStream per request (one Rust call per token instead of two decodes), where the
        decoder keeps it exact; see `StreamDetokenizer`."""
        from ie_jax.detokenizer import IncrementalDetokenizer, StreamDetokenizer
        if self._decode_stream_exact is None:
            self._decode_stream_exact = StreamDetokenizer.supports(self._backend)
        if not self._decode_stream_exact:
            return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)
        return StreamDetokenizer(self, self._backend, prompt_ids, skip_special_tokens)


# ---------------------------------------------------------------------------------------------------------------
# ByteTokenizer

BYTE_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")

BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _byte_level_alphabet() -> list[str]:
    """The printable stand-in character for each byte used by byte-level BPE (GPT-2): 0x20 ' ' is 'Ġ'.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes take the code points 256, 257, ... in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, then the specials in `BYTE_SPECIAL_TOKENS` (256..262)."""

    PAD, BOS, EOS, USER, ASSISTANT, SYSTEM, END = range(256, 263)

    def __init__(self):
        self.vocab_size = 256 + len(BYTE_SPECIAL_TOKENS)
        self.bos_token_id, self.pad_token_id = self.BOS, self.PAD
        self.eos_token_ids = (self.EOS, self.END)  # <|end|> closes a chat turn, so generation stops there too
        self.bos_token, self.eos_token, self.pad_token = "<|bos|>", "<|eos|>", "<|pad|>"
        self.chat_templates = {"default": BYTE_CHAT_TEMPLATE}
        self._special_id = {t: 256 + i for i, t in enumerate(BYTE_SPECIAL_TOKENS)}
        # Special strings inside the text become their ids, as added tokens do in `tokenizers`.
        self._special_split = re.compile("(" + "|".join(map(re.escape, BYTE_SPECIAL_TOKENS)) + ")")
        self._special_bytes = [t.encode() for t in BYTE_SPECIAL_TOKENS]
        self._tokens = _byte_level_alphabet() + list(BYTE_SPECIAL_TOKENS)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = [self.BOS] if add_special_tokens else []
        for i, piece in enumerate(self._special_split.split(text)):
            if i % 2:  # odd pieces are the captured special strings
                ids.append(self._special_id[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = self._checked_ids(ids)
        if not ids or max(ids) < 256:
            data = bytes(ids)
        elif skip_special_tokens:
            data = bytes([i for i in ids if i < 256])
        else:
            data = bytearray()
            for i in ids:
                if i < 256:
                    data.append(i)
                else:
                    data += self._special_bytes[i - 256]
        return data.decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tokens[i] for i in self._checked_ids(ids)]

    def is_special(self, token_id: int) -> bool:
        return 256 <= token_id < self.vocab_size

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and the EOS/BOS/PAD ids of generation_config.json.

        tokenizer.json is a byte-level BPE with the 256 byte characters and no merges, so `HFTokenizer` reads back
        the same ids. An existing generation_config.json keeps its other fields.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        alphabet = _byte_level_alphabet()
        backend = tokenizers.Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(alphabet)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                    for t in BYTE_SPECIAL_TOKENS])
        assert [backend.token_to_id(t) for t in BYTE_SPECIAL_TOKENS] == list(range(256, self.vocab_size))
        backend.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", self.BOS)])
        backend.save(str(directory / "tokenizer.json"))

        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "clean_up_tokenization_spaces": False,
            "chat_template": BYTE_CHAT_TEMPLATE,
            "added_tokens_decoder": {
                str(256 + i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                               "rstrip": False, "single_word": False}
                for i, t in enumerate(BYTE_SPECIAL_TOKENS)},
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        generation_path = directory / "generation_config.json"
        generation = _read_json(generation_path)
        generation.update(bos_token_id=self.BOS, eos_token_id=list(self.eos_token_ids), pad_token_id=self.PAD)
        generation_path.write_text(json.dumps(generation, indent=2) + "\n")


class SyntheticTokenizer(Tokenizer):
    """Stands in for the tokenizer of a preset that ships none (a real architecture with `--load-format dummy`
    weights): id i is the word " w{i}", so every token has text and streaming, stop handling and benchmarks behave
    as with a real tokenizer. encode maps such words back to their ids and any other word to an id by hash."""

    def __init__(self, vocab_size: int, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = ()):
        self.vocab_size = vocab_size
        self.bos_token_id, self.pad_token_id = bos_token_id, None
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_templates = {"default": SYNTHETIC_CHAT_TEMPLATE}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        for word in text.split():
            if word[:1] == "w" and word[1:].isdigit() and int(word[1:]) < self.vocab_size:
                ids.append(int(word[1:]))
            else:
                ids.append(int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest()) % self.vocab_size)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = self._checked_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if not self.is_special(i)]
        return "".join(f" w{i}" for i in ids)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [f"w{i}" for i in self._checked_ids(ids)]

    def is_special(self, token_id: int) -> bool:
        return token_id == self.bos_token_id or token_id in self.eos_token_ids

    def incremental_detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        """Every id is a whole word, so no window of ids is needed and the prompt changes nothing."""
        from ie_jax.detokenizer import WordDetokenizer
        special = frozenset(i for i in (self.bos_token_id, *self.eos_token_ids) if i is not None)
        return WordDetokenizer(self.vocab_size, special if skip_special_tokens else frozenset())


SYNTHETIC_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """Load the tokenizer of an HF checkpoint directory; FileNotFoundError names a missing tokenizer.json."""
    return HFTokenizer.load(path)
