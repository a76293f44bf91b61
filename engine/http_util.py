"""The server's HTTP plumbing: merging the async streams of a request's choices, waiting for a client to leave,
the API-key middleware and OpenAI-style error responses."""
from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

import engine.protocol as P


async def merge_streams(gens: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's position."""
    pending = {asyncio.ensure_future(anext(g)): i for i, g in enumerate(gens)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(gens[i]))] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*pending, return_exceptions=True)


async def wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class BearerAuth:
    """Plain ASGI middleware (it leaves streams untouched): /v1 routes need 'Authorization: Bearer <api_key>';
    /health, /metrics and the tokenizer routes stay open, as in vLLM."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response("Unauthorized: send 'Authorization: Bearer <api key>'", 401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def error_response(message: str, status: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(P.error_body(message, status, param), status_code=status)
