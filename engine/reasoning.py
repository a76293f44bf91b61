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
content only. A grammar (response_format, guided_*, a forced tool call) holds only what follows the thought, as in
vLLM (`ie_jax.regex_dfa.after_thought`); a server started with enable_in_reasoning lets it hold the whole reply,
which then thinks only where it writes <think> itself.

`ChatMode` is what the server asks: a chat choice's whole text → (content, reasoning, tool calls), and, per
streaming choice, `ChatStream` turns each new piece of text into the chunk's delta. Both are linear in the text.
"""
from __future__ import annotations

import dataclasses

from engine.tools import ToolMode, ToolStream, tag_start, tool_finish

PARSERS = ("qwen3", "deepseek_r1")
START, END = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ReasoningParser:
    name: str

    def __post_init__(self):
        if self.name not in PARSERS:
            raise ValueError(f"unknown reasoning parser {self.name!r}: choose one of {', '.join(PARSERS)}")

    def start(self, prompt_text: str) -> str:
        """Where the reply starts, from the prompt's end: "open" in thought (the prompt opened the block, or R1),
        "closed" past it (the prompt closed one: thinking switched off), else "optional" (the reply may open one
        with its first bytes)."""
        tail = prompt_text.rstrip()
        if tail.endswith(END):
            return "closed"
        return "open" if self.name == "deepseek_r1" or tail.endswith(START) else "optional"

    def split(self, text: str, prompt_thinks: bool) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole reply; reasoning is None where it does not think, content None where
        it has none."""
        stream = ReasoningStream(self, prompt_thinks)
        reasoning, content = stream.feed(text, final=True)
        return (reasoning if stream.thinks else None), (content or None)


@dataclasses.dataclass
class ReasoningStream:
    """One reply read piece by piece: `feed` returns the new reasoning and content text, holding back what may
    still be (the start of) a tag, or the spaces before the content."""
    parser: ReasoningParser
    prompt_thinks: bool  # the reply starts in thought: start(prompt) == "open"
    state: str = "start"  # start → thought → lead (spaces before the content) → content
    thinks: bool = False
    pending: str = ""

    def feed(self, piece: str, final: bool) -> tuple[str, str]:
        text, reasoning, content = self.pending + piece, "", ""
        self.pending = ""
        while True:
            if self.state == "start":
                if text.startswith(START):  # written by the reply (perhaps again, after the template's)
                    text, self.state = text[len(START):], "thought"
                elif not final and START.startswith(text):  # "", "<", "<thi": not yet known
                    self.pending = text
                    return reasoning, content
                else:
                    self.state = "thought" if self.prompt_thinks else "lead"
                self.thinks = self.state == "thought"
            elif self.state == "thought":
                i = text.find(END)
                if i < 0:
                    held = 0 if final else tag_start(text, END)
                    reasoning += text[:len(text) - held]
                    self.pending = text[len(text) - held:]
                    return reasoning, content
                reasoning += text[:i]
                text, self.state = text[i + len(END):], "lead"
            elif self.state == "lead":
                text = text.lstrip()
                if not text:
                    return reasoning, content
                self.state = "content"
            else:
                return reasoning, content + text


@dataclasses.dataclass(frozen=True)
class ChatMode:
    """How a chat request's reply becomes its message: reasoning split off (`reasoning`), then tool calls parsed
    out of the content (`tools`). Where both are None the text is the content as it is."""
    tools: ToolMode | None = None
    reasoning: ReasoningParser | None = None
    prompt_thinks: bool = False
    include_reasoning: bool = True  # vLLM's request field: False drops the reasoning from the response

    def message(self, text: str, finish_reason: str | None) -> tuple[str | None, str | None, list | None, str | None]:
        """(content, reasoning, tool calls, finish reason) of a whole reply."""
        reasoning, content = (None, text) if self.reasoning is None else self.reasoning.split(text, self.prompt_thinks)
        calls = None
        if self.tools is not None:
            content, calls = self.tools.parse(content or "")
        return content, reasoning if self.include_reasoning else None, calls, tool_finish(self.tools, calls,
                                                                                          finish_reason)


@dataclasses.dataclass
class ChatStream:
    """What of one streaming chat choice went out."""
    mode: ChatMode
    reasoning: ReasoningStream | None = None
    content: str = ""  # with tools: the content so far
    tools: ToolStream = dataclasses.field(default_factory=ToolStream)

    def __post_init__(self):
        if self.mode.reasoning is not None:
            self.reasoning = ReasoningStream(self.mode.reasoning, self.mode.prompt_thinks)

    def delta(self, piece: str, finish_reason: str | None) -> tuple[dict | None, str | None]:
        """The chunk's delta for the reply's next `piece` of text (None: nothing to send yet) and the finish reason
        to send with it (set once the reply is complete)."""
        final = finish_reason is not None
        thought, piece = ("", piece) if self.reasoning is None else self.reasoning.feed(piece, final)
        delta = {}
        if thought and self.mode.include_reasoning:
            delta["reasoning"] = delta["reasoning_content"] = thought
        if self.mode.tools is None:
            if piece:
                delta["content"] = piece
        else:
            self.content += piece
            calls, finish_reason = self.mode.tools.stream_delta(self.content, self.tools, finish_reason)
            delta.update(calls or {})
        return (delta if delta or final else None), finish_reason
