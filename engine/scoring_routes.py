"""vLLM's score and rerank APIs over the server's embeddings (engine/pooling.py): a pair's score is the cosine
similarity of the two texts' pooled embeddings, which is what vLLM computes for an embedding model (a cross-encoder
would score the pair in one forward; none is served here).

    POST /score, /v1/score            {"text_1": str | [str], "text_2": str | [str]}: one score per pair
    POST /rerank, /v1/rerank, /v2/rerank
                                      {"query": str, "documents": [str], "top_n": k}: documents by score, best first

One text against a list pairs it with each entry; two lists pair entry by entry and must be as long.
"""
from __future__ import annotations

import time
import uuid

import numpy as np

from engine import protocol as P
from engine.pooling import pair_texts, unit_rows


class ScoreRequest(P._Request):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True


class RerankRequest(P._Request):
    model: str | None = None
    query: str
    documents: list[str]
    top_n: int = 0  # 0: every document
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True


def pairs(text_1, text_2) -> list[tuple[str, str]]:
    try:
        return pair_texts(text_1, text_2)
    except ValueError as e:
        raise P.ServerError(str(e), param="text_1" if str(e).startswith("text_1 cannot") else "text_2") from None


def add_routes(app, server) -> None:
    async def embed(texts: list[str], body) -> tuple[np.ndarray, int]:
        """Unit-length embeddings [n, D] of distinct texts (each computed once), and the tokens they took."""
        unique = list(dict.fromkeys(texts))
        vectors, ids = await server.embed(unique, body, "scoring")
        vectors = unit_rows(vectors)
        row = {t: i for i, t in enumerate(unique)}
        return vectors[[row[t] for t in texts]], sum(map(len, ids))

    async def score(body: ScoreRequest):
        both = pairs(body.text_1, body.text_2)
        vectors, tokens = await embed([t for pair in both for t in pair], body)
        scores = (vectors[0::2] * vectors[1::2]).sum(-1)
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": server.model_name, "data": [{"index": i, "object": "score", "score": float(s)}
                                                     for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def rerank(body: RerankRequest):
        if not body.query:
            raise P.ServerError("query cannot be empty", param="query")
        if not body.documents or any(not d for d in body.documents):
            raise P.ServerError("documents cannot be empty", param="documents")
        if body.top_n < 0:
            raise P.ServerError(f"top_n={body.top_n} must be >= 0 (0: every document)", param="top_n")
        vectors, tokens = await embed([body.query, *body.documents], body)
        scores = vectors[1:] @ vectors[0]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.top_n or None]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": server.model_name, "usage": {"total_tokens": tokens},
                "results": [{"index": i, "document": {"text": body.documents[i]}, "relevance_score": float(scores[i])}
                            for i in order]}

    for path in ("/score", "/v1/score"):
        app.post(path)(score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path)(rerank)
