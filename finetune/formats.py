"""Dataset files → token ids: JSONL in the formats TRL reads, with the loss mask each format implies.

  SFT   {"text": ...}                                   language modelling; every token is trained
        {"prompt": ..., "completion": ...}              loss on the completion only (by default)
        {"messages": [{"role", "content"}, ...]}        chat template; loss on assistant turns only (by default)
        (prompt/completion may also be message lists: the conversational prompt-completion format)
  DPO   {"prompt", "chosen", "rejected"}                strings, or message lists (conversational)

The format is read off the first line; every later line must carry the same columns. A bad line raises
`DatasetError` naming the file and line number. Assistant turns are found by rendering the conversation prefix by
prefix, so the chat template must be prefix-stable (what it renders for the first k messages is a prefix of what
it renders for all of them); a template that is not raises rather than masking the wrong tokens.

This module knows nothing of packing, batching or arrays beyond the int lists it returns (see data.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

SFT_FORMATS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


class DatasetError(ValueError):
    """A dataset line that cannot be used; the message starts with `file:line:`."""


@dataclasses.dataclass(frozen=True)
class SFTExample:
    ids: np.ndarray  # [S] int32
    mask: np.ndarray  # [S] bool: tokens that are predicted with loss
    where: str = ""  # file:line, for error messages


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    prompt_ids: np.ndarray  # [P] int32
    chosen_ids: np.ndarray  # [C] int32 (ends with EOS)
    rejected_ids: np.ndarray  # [R] int32 (ends with EOS)
    where: str = ""


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; invalid JSON or a non-object raises with file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise DatasetError(f"{path}: the file holds no examples")
    return rows


def detect_sft_format(row: dict, where: str) -> str:
    for name, columns in (("messages", SFT_FORMATS["messages"]), ("prompt_completion", ("prompt", "completion")),
                          ("text", ("text",))):
        if all(c in row for c in columns):
            return name
    if "prompt" in row:
        raise DatasetError(f"{where}: missing column 'completion' (a prompt needs a completion; columns: "
                           f"{sorted(row)})")
    raise DatasetError(f"{where}: no SFT columns; expected one of 'text', 'prompt'+'completion' or 'messages', "
                       f"got {sorted(row)}")


def _require(row: dict, columns, where: str, kind: str):
    for c in columns:
        if c not in row:
            raise DatasetError(f"{where}: missing column {c!r} (the dataset is in the {kind} format; columns here: "
                               f"{sorted(row)})")


def _check_messages(messages, where: str, column: str):
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: {column!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DatasetError(f"{where}: {column}[{i}] must be an object with 'role' and 'content', got {m!r}")


def _text(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    return value


def _render(tokenizer, messages, *, add_generation_prompt: bool, where: str) -> str:
    if tokenizer.chat_template is None:
        raise DatasetError(f"{where}: conversational data needs a chat template, and the tokenizer has none")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def _chat_pieces(tokenizer, messages, where: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant) pieces by rendering it prefix by prefix."""
    pieces, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prefix = _render(tokenizer, messages[:k], add_generation_prompt=True, where=where) if k else ""
            if not prefix.startswith(done):
                raise DatasetError(f"{where}: the chat template is not prefix-stable; cannot find assistant turns")
            pieces.append((prefix[len(done):], False))
            done = prefix
        full = _render(tokenizer, messages[:k + 1], add_generation_prompt=False, where=where)
        if not full.startswith(done):
            raise DatasetError(f"{where}: the chat template is not prefix-stable; cannot find assistant turns")
        pieces.append((full[len(done):], message["role"] == "assistant"))
        done = full
    return [(t, a) for t, a in pieces if t]


def _encode_pieces(tokenizer, pieces, completion_only: bool) -> SFTExample:
    ids, mask = [], []
    for text, trained in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [trained or not completion_only] * len(piece)
    return SFTExample(np.asarray(ids, np.int32), np.asarray(mask, bool))


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_ids[0]] if tokenizer.eos_token_ids else []


def tokenize_sft(row: dict, fmt: str, tokenizer, *, completion_only: bool = True, where: str = "") -> SFTExample:
    """One JSONL object in SFT format `fmt` -> ids and loss mask (see module docstring)."""
    _require(row, SFT_FORMATS[fmt], where, fmt)
    if fmt == "text":
        ids = tokenizer.encode(_text(row["text"], where, "text")) + _eos(tokenizer)
        return SFTExample(np.asarray(ids, np.int32), np.ones(len(ids), bool))
    if fmt == "messages":
        _check_messages(row["messages"], where, "messages")
        return _encode_pieces(tokenizer, _chat_pieces(tokenizer, row["messages"], where), completion_only)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # conversational prompt-completion
        _check_messages(prompt, where, "prompt")
        _check_messages(completion, where, "completion")
        pieces = _chat_pieces(tokenizer, prompt + completion, where)
        return _encode_pieces(tokenizer, pieces, completion_only)
    prompt_ids = tokenizer.encode(_text(prompt, where, "prompt"))
    completion_ids = tokenizer.encode(_text(completion, where, "completion"), add_special_tokens=False) \
        + _eos(tokenizer)
    ids = prompt_ids + completion_ids
    mask = [not completion_only] * len(prompt_ids) + [True] * len(completion_ids)
    return SFTExample(np.asarray(ids, np.int32), np.asarray(mask, bool))


def tokenize_preference(row: dict, tokenizer, *, where: str = "") -> PreferenceExample:
    """{"prompt", "chosen", "rejected"} (strings or message lists) -> prompt, chosen and rejected ids."""
    _require(row, PREFERENCE_COLUMNS, where, "preference")
    prompt, chosen, rejected = (row[c] for c in PREFERENCE_COLUMNS)
    if isinstance(prompt, list):
        for c in PREFERENCE_COLUMNS:
            _check_messages(row[c], where, c)
        prefix = _render(tokenizer, prompt, add_generation_prompt=True, where=where)

        def completion(messages, column):
            full = _render(tokenizer, prompt + messages, add_generation_prompt=False, where=where)
            if not full.startswith(prefix):
                raise DatasetError(f"{where}: the chat template is not prefix-stable; cannot split {column!r}")
            return tokenizer.encode(full[len(prefix):], add_special_tokens=False)

        prompt_ids = tokenizer.encode(prefix, add_special_tokens=False)
        chosen_ids, rejected_ids = completion(chosen, "chosen"), completion(rejected, "rejected")
    else:
        prompt_ids = tokenizer.encode(_text(prompt, where, "prompt"))
        chosen_ids = tokenizer.encode(_text(chosen, where, "chosen"), add_special_tokens=False) + _eos(tokenizer)
        rejected_ids = tokenizer.encode(_text(rejected, where, "rejected"), add_special_tokens=False) \
            + _eos(tokenizer)
    as_array = lambda x: np.asarray(x, np.int32)  # noqa: E731
    return PreferenceExample(as_array(prompt_ids), as_array(chosen_ids), as_array(rejected_ids))


def load_sft(path, tokenizer, *, completion_only: bool = True) -> list[SFTExample]:
    rows = read_jsonl(path)
    fmt = detect_sft_format(rows[0][1], f"{path}:{rows[0][0]}")
    return [dataclasses.replace(tokenize_sft(row, fmt, tokenizer, completion_only=completion_only,
                                             where=f"{path}:{n}"), where=f"{path}:{n}") for n, row in rows]


def load_preference(path, tokenizer) -> list[PreferenceExample]:
    return [dataclasses.replace(tokenize_preference(row, tokenizer, where=f"{path}:{n}"), where=f"{path}:{n}")
            for n, row in read_jsonl(path)]
