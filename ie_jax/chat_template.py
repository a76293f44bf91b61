"""Render Hugging Face chat templates (jinja2) into prompt text.

A checkpoint's chat template is a jinja2 program that turns a list of messages into the exact prompt string the
model was trained on. This module renders one the way transformers does, so a prompt built here is byte-identical
to one built there:

- an `ImmutableSandboxedEnvironment` (templates cannot mutate their inputs or reach Python internals) with
  `trim_blocks=True`, `lstrip_blocks=True` and the `loopcontrols` extension (`{% break %}`, `{% continue %}`);
- the globals `raise_exception(msg)` and `strftime_now(fmt)`;
- a `tojson` filter that writes real JSON (non-ASCII kept, nothing HTML-escaped, optional `indent`), unlike
  jinja2's built-in one;
- a `{% generation %}...{% endgeneration %}` block that renders its body unchanged (training templates mark the
  assistant's tokens with it).

Every error raised while compiling or rendering comes out as `ChatTemplateError`, a `ValueError`, so the server
can answer it as a bad request.

This module knows nothing of tokenizers or token ids: `Tokenizer.apply_chat_template` picks the template and the
special-token strings and encodes the result. It does not convert Python functions into tool schemas, and it does
not implement assistant-token masks; `continue_final` cuts a rendered chat after its final message, which is what
transformers' `continue_final_message` does.
"""
from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError, jinja2.TemplateError):
    """A chat template failed to compile or render, or raised on purpose through `raise_exception`."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat prompts need the plain JSON text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders as `body`; the block only marks assistant text."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile `template` once; later calls with the same string reuse the compiled program."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"{template=} must be a non-empty string")
    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True, bos_token: str | None = None,
                         eos_token: str | None = None, **variables: Any) -> str:
    """Render `messages` through `template`.

    `variables` reach the template as they are (tools, documents, enable_thinking, pad_token, ...). Special-token
    strings that the tokenizer lacks are passed as "" so templates that concatenate them still render.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}]={message!r} must be a dict with 'role' and 'content'")
    compiled = compile_chat_template(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "", **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e


def select_chat_template(templates: Mapping[str, str], requested: str | None = None,
                         has_tools: bool = False) -> str:
    """Pick the template to render from a tokenizer's named templates.

    `requested` is either one of the names or a template string itself. With no request, "tool_use" wins when
    tools are given and the checkpoint has such a template; otherwise "default".
    """
    if requested is not None:
        return templates.get(requested, requested)
    if has_tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if not templates:
        raise ValueError(
            "this tokenizer has no chat template; pass one with apply_chat_template(..., chat_template='...') "
            "or add 'chat_template' to tokenizer_config.json (or a chat_template.jinja file)")
    raise ValueError(f"no 'default' chat template among {sorted(templates)}; pass chat_template=<name>")


def parse_chat_templates(value: Any) -> dict[str, str]:
    """Named templates from tokenizer_config.json's `chat_template`: a string, or a list of {name, template}."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, Sequence) and all(isinstance(t, Mapping) for t in value):
        try:
            return {t["name"]: t["template"] for t in value}
        except KeyError as e:
            raise ValueError(f"chat_template entries need 'name' and 'template': {value!r:.200}") from e
    raise ValueError(f"chat_template={value!r:.200} must be a string or a list of {{name, template}} dicts")


def continue_final(text: str, final: str) -> str:
    """A rendered chat cut right after its final message, so that the model goes on with that message instead of
    starting a new turn (what transformers' `continue_final_message` gives). The message is found by its stripped
    text, last occurrence; its trailing spaces stay only where the template kept them."""
    core = final.strip()
    if not core or core not in text:
        raise ValueError(f"continue_final_message: the final message's content {final!r} does not appear in the "
                         f"rendered chat, so there is nothing to continue")
    at = text.rindex(core)
    return text[:at + (len(final) if text.startswith(final, at) else len(core))]


def content_text(content, kinds: tuple[str, ...] = ("text",)) -> str:
    """A chat message's content as one string: text as it is, None as "", a list of content parts joined from
    their text. Parts of other kinds (images, audio) raise ValueError naming the part."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
            raise ValueError(f"content part {part!r} is not supported: only type {' or '.join(map(repr, kinds))}")
        texts.append(part["text"])
    return "".join(texts)
