"""Reasoning output on /v1/chat/completions (`--reasoning-parser`): a thinking model's `<think> ... </think>` goes
to the message's `reasoning` field (also sent as `reasoning_content`, the older name clients still read), the rest
to `content`.

    qwen3        Qwen3 and its -Thinking variants. The reply thinks if it starts with <think>, or if the prompt
                 (the chat template's output) already ends with <think>. With enable_thinking=False the template
                 closes an empty block in the prompt, and the whole reply is content.
    deepseek_r1  DeepSeek-R1 and QwQ: the reply always starts in thought (the template may or may not have
                 written the <think>), up to </think>.

A reply that thinks and never closes its block (cut short by max_tokens) is all reasoning, streamed or not, so
the two agree. Content starts at its first non-space character after </think>. Tool calls are parsed out of the
content only. Structured outputs (response_format, guided_*) hold the whole reply, thought included: a guided
reply of a thinking model is content.
"""
from __future__ import annotations

import dataclasses

PARSERS = ("qwen3", "deepseek_r1")
START, END = "<think>", "</think>"


def _tail_of(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag` (held back while streaming)."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)


@dataclasses.dataclass(frozen=True)
class ReasoningParser:
    name: str

    def __post_init__(self):
        if self.name not in PARSERS:
            raise ValueError(f"unknown reasoning parser {self.name!r}: choose one of {', '.join(PARSERS)}")

    def thinks_from_prompt(self, prompt_text: str) -> bool:
        """Whether the reply starts in thought whatever it writes first: the prompt opened the block."""
        return self.name == "deepseek_r1" or prompt_text.rstrip().endswith(START)

    def split(self, text: str, prompt_thinks: bool, final: bool = True) -> tuple[str | None, str | None, int]:
        """(reasoning, content, held): the reply `text` so far split in two. Not `final`, the last `held`
        characters may still be (the start of) a tag or the space before the content, and are left out of both.
        reasoning is None for a reply that does not think; content is None while (or if) it has none."""
        if not (prompt_thinks or self.name == "deepseek_r1"):
            if text.startswith(START):
                prompt_thinks, text = True, text[len(START):]
            elif not final and START.startswith(text):  # "", "<", "<thi": not yet known
                return None, None, len(text)
            else:
                return None, *self._content(text, final)
        else:
            if text.startswith(START):  # the reply wrote the tag the template may already have
                text = text[len(START):]
            elif not final and text and START.startswith(text):
                return "", None, len(text)
        thought, closed, rest = text.partition(END)
        if not closed:
            held = 0 if final else _tail_of(thought, END)
            return thought[:len(thought) - held], None, held
        content, held = self._content(rest, final)
        return thought, content, held

    @staticmethod
    def _content(text: str, final: bool) -> tuple[str | None, int]:
        body = text.lstrip()
        if not body:
            return None, 0 if final else len(text)
        return body, 0


@dataclasses.dataclass
class ReasoningStream:
    """What of one streaming choice went out: characters of reasoning and of content."""
    parser: ReasoningParser
    prompt_thinks: bool
    reasoning_sent: int = 0
    content_sent: int = 0

    def delta(self, text: str, final: bool) -> tuple[str, str | None]:
        """(new reasoning, content so far): the reasoning characters not yet sent, and the whole content text
        the reply has so far (None before any), for the caller to send what is new of it."""
        reasoning, content, _ = self.parser.split(text, self.prompt_thinks, final)
        new = (reasoning or "")[self.reasoning_sent:]
        self.reasoning_sent += len(new)
        return new, content

    def content_delta(self, content: str | None) -> str:
        new = (content or "")[self.content_sent:]
        self.content_sent += len(new)
        return new
