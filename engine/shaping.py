"""Engine outputs → one response body, or its SSE chunks (engine/server.py's last stage).

A response is n choices (`jobs`, each with its `index`, `prompt_ids` and echo text); `outs` yields (job, delta)
pairs until every job finished. `Reply` holds what shapes them: the kind of response, echo, logprobs and their
format, the chat mode (tools, reasoning). Nothing here touches the engine: leaving an iterator early is how a
caller's disconnect reaches `outs`, which aborts the requests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator

import engine.protocol as P
from engine.outputs import RequestOutput
from engine.reasoning import ChatMode, ChatStream


@dataclasses.dataclass
class Choice:
    """What has arrived for one choice so far."""
    text: list[str] = dataclasses.field(default_factory=list)
    text_len: int = 0  # characters in `text`
    num_tokens: int = 0
    num_prompt: int = 0
    num_cached: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[tuple[int, dict[int, float]]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[tuple[int, dict[int, float] | None]] | None = None  # echo with logprobs
    started: bool = False  # streaming: a chunk of this choice went out
    chat: ChatStream | None = None  # streaming chat with tools or reasoning: what went out
    held: list = dataclasses.field(default_factory=list)  # logprobs of text not yet sent (a tag held back)
    echo_len: int = 0  # streaming: characters of echoed prompt before the generated text
    token_ids: list[int] = dataclasses.field(default_factory=list)  # return_token_ids: the choice's tokens so far
    ids_sent: int = 0  # streaming: how many of `token_ids` went out


@dataclasses.dataclass
class Reply:
    """How one request's choices become its response."""
    kind: str  # "text_completion" | "chat.completion"
    request_id: str
    model: str  # the name the response gives (the adapter's, for a LoRA request)
    fmt: P.LogprobFormat
    echo: bool = False  # completions: the prompt's text (and logprobs) before each choice's
    num_top: int | None = None  # logprobs: None for none, else how many top alternatives per token
    chat: ChatMode | None = None  # chat with tools or reasoning: how the reply's text becomes its message
    role: str = "assistant"
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs field (the completion choices', the chat response's)
    token_ids: bool = False  # vLLM's return_token_ids: prompt_token_ids and token_ids beside the text


def absorb(choice: Choice, out: RequestOutput, prompt_ids: list[int],
           keep_ids: bool = False) -> list[tuple[int, dict[int, float]]]:
    """Adds a delta to the choice; returns the delta's (token id, logprobs) entries."""
    choice.text.append(out.new_text)
    if keep_ids:
        choice.token_ids.extend(out.new_token_ids)
    choice.text_len += len(out.new_text)
    choice.num_tokens = out.num_output_tokens or choice.num_tokens + len(out.new_token_ids)
    choice.num_prompt, choice.num_cached = out.num_prompt_tokens, out.num_cached_tokens
    entries = list(zip(out.new_token_ids, out.new_logprobs)) if out.new_logprobs else []
    choice.logprobs.extend(entries)
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = list(zip(prompt_ids, out.prompt_logprobs))
    if out.finished:
        choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
    return entries


def total_usage(jobs, choices: dict[int, Choice]) -> dict:
    """Prompt tokens count once per prompt, whatever n is (as in vLLM)."""
    prompts = {id(j.prompt_ids): (len(j.prompt_ids), choices[j.index].num_cached) for j in jobs}
    completion = sum(c.num_tokens for c in choices.values())
    return P.usage(sum(n for n, _ in prompts.values()), completion, sum(c for _, c in prompts.values()))


async def collect(outs: AsyncIterator, reply: Reply, jobs) -> dict:
    """The whole response body, once every choice has finished."""
    fmt, num_top = reply.fmt, reply.num_top
    choices = {j.index: Choice() for j in jobs}
    try:
        async with contextlib.aclosing(outs):
            async for job, out in outs:
                absorb(choices[job.index], out, job.prompt_ids, reply.token_ids)
    except ValueError as e:
        raise P.ServerError(str(e)) from e
    scored = {}  # prompt logprobs per prompt (the server scores a prompt once, whatever n is)
    for j in jobs:
        if choices[j.index].prompt_logprobs is not None:
            scored.setdefault(id(j.prompt_ids), choices[j.index].prompt_logprobs)
    body = []
    for j in sorted(jobs, key=lambda j: j.index):
        c = choices[j.index]
        text = "".join(c.text)
        if reply.kind == "text_completion":
            prefix = (j.prompt_text or "") if reply.echo else ""
            lp = None
            if num_top is not None:
                lp = fmt.echoed(c.prompt_logprobs, c.logprobs, prefix) if reply.echo and c.prompt_logprobs \
                    is not None else fmt.completion(c.logprobs, len(prefix))
            choice = P.completion_choice(j.index, prefix + text, lp, c.finish_reason, c.stop_reason)
            if reply.prompt_logprobs:
                choice["prompt_logprobs"] = fmt.prompt(scored.get(id(j.prompt_ids), []))
            if reply.token_ids:
                choice["prompt_token_ids"], choice["token_ids"] = j.prompt_ids, c.token_ids
        else:
            lp = fmt.chat(c.logprobs, num_top) if num_top is not None else None
            content, reasoning, calls, finish = (text, None, None, c.finish_reason) if reply.chat is None else \
                reply.chat.message(text, c.finish_reason)
            choice = P.chat_choice(j.index, content, lp, finish, c.stop_reason, calls, reply.role, reasoning)
            if reply.token_ids:
                choice["token_ids"] = c.token_ids
        body.append(choice)
    response = P.envelope(reply.kind, reply.request_id, int(time.time()), reply.model, body,
                          total_usage(jobs, choices))
    if reply.kind != "text_completion" and jobs:  # chat: one prompt, its fields on the response
        if reply.prompt_logprobs:
            response["prompt_logprobs"] = fmt.prompt(scored.get(id(jobs[0].prompt_ids), []))
        if reply.token_ids:
            response["prompt_token_ids"] = jobs[0].prompt_ids
    return response


async def stream(outs: AsyncIterator, reply: Reply, jobs, include_usage: bool,
                 continuous_usage: bool) -> AsyncIterator[str]:
    """The response as SSE events, ending with `data: [DONE]`. An error after the headers went out is one error
    event (as vLLM reports it), then [DONE]."""
    fmt, num_top, chat = reply.fmt, reply.num_top, reply.chat
    chunk_kind = "text_completion" if reply.kind == "text_completion" else "chat.completion.chunk"
    created = int(time.time())
    choices = {j.index: Choice() for j in jobs}

    def event(body: list[dict], usage: dict | None = None, **extra) -> str:
        obj = {**P.envelope(chunk_kind, reply.request_id, created, reply.model, body, usage), **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    try:
        if chunk_kind == "chat.completion.chunk":  # the role goes first, before any token
            for n, j in enumerate(jobs):
                # with return_token_ids the prompt's ids ride on the first chunk, as vLLM sends them
                extra = {"prompt_token_ids": j.prompt_ids} if reply.token_ids and n == 0 else {}
                yield event([P.chat_delta_choice(j.index, {"role": reply.role, "content": ""})], **extra)
        async with contextlib.aclosing(outs):
            async for job, out in outs:
                c = choices[job.index]
                entries = absorb(c, out, job.prompt_ids, reply.token_ids)
                if not (out.new_text or out.finished or entries):
                    continue
                finish, stop = (out.finish_reason, out.stop_reason) if out.finished else (None, None)
                if chunk_kind == "text_completion":
                    prefix = (job.prompt_text or "") if reply.echo and not c.started else ""
                    c.echo_len += len(prefix)
                    offset = c.echo_len + c.text_len - len(out.new_text)
                    lp = None
                    if num_top is not None:
                        lp = fmt.echoed(c.prompt_logprobs, entries, prefix) if prefix and \
                            c.prompt_logprobs else fmt.completion(entries, offset)
                    body = P.completion_choice(job.index, prefix + out.new_text, lp, finish, stop)
                elif chat is not None:  # reasoning split off; calls as deltas, the rest as content
                    c.chat, c.held = c.chat or ChatStream(chat), c.held + entries
                    delta, finish = c.chat.delta(out.new_text, finish)
                    if delta is None:
                        continue
                    lp = fmt.chat(c.held, num_top) if num_top is not None else None
                    body, c.held = P.chat_delta_choice(job.index, delta, lp, finish, stop), []
                else:
                    lp = fmt.chat(entries, num_top) if num_top is not None else None
                    delta = {"content": out.new_text} if out.new_text or not out.finished else {}
                    body = P.chat_delta_choice(job.index, delta, lp, finish, stop)
                if reply.token_ids:  # the ids of the text this chunk carries (held-back tokens go out with it)
                    body["token_ids"], c.ids_sent = c.token_ids[c.ids_sent:], len(c.token_ids)
                    if chunk_kind == "text_completion" and not c.started:
                        body["prompt_token_ids"] = job.prompt_ids
                c.started = True
                usage = (P.usage(c.num_prompt, c.num_tokens, c.num_cached) if continuous_usage else None)
                yield event([body], usage)
        if include_usage:
            yield event([], total_usage(jobs, choices))
    except ValueError as e:
        yield f"data: {json.dumps(P.error_body(str(e), 400))}\n\n"
    except Exception as e:  # the headers are gone: report in-band, as vLLM does
        yield f"data: {json.dumps(P.error_body(f'{type(e).__name__}: {e}', 500))}\n\n"
    yield "data: [DONE]\n\n"
