"""Embeddings from the served model (vLLM's pooling models: `LLM.embed`, the server's /v1/embeddings).

A prompt's embedding is its final normed hidden states pooled over the prompt: the last token's (LAST, vLLM's default
for decoder models such as Qwen3-Embedding or e5-mistral), their mean (MEAN) or the first token's (CLS), then
L2-normalized unless the pooler config says not to. It is one dense causal forward, like prompt logprobs
(ModelRunner.score): outside the paged step, so the step's executables and the KV cache are untouched, compiled once
per (rows, length) bucket on first use. Prompts are batched as rows of a bucket whose tokens stay within the
scorer's token cap (`ModelRunner.max_score_tokens`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine.config import PoolerConfig, pow2_bucket
from ie_jax.models.context import DenseCausal

def _embed_flat(graphdef, weights_tree, pooling: str, normalize: bool, token_ids, lengths, lora_slots, *weights):
    """token_ids [B, L] (each row's prompt, then padding), lengths [B] -> pooled embeddings [B, D] f32. Padding
    after a prompt changes nothing before it (causal); MEAN averages the prompt's tokens only."""
    state, layer_states = jax.tree.unflatten(weights_tree, weights)
    hidden, _ = nnx.merge(graphdef, state)(token_ids, ctx=DenseCausal(lora_slots=lora_slots),
                                           layer_states=layer_states, hidden=True)
    hidden = hidden.astype(jnp.float32)  # [B, L, D]
    if pooling == "LAST":
        out = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    elif pooling == "CLS":
        out = hidden[:, 0]
    else:
        mask = (jnp.arange(token_ids.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
        out = (hidden * mask[..., None]).sum(axis=1) / lengths[:, None].astype(jnp.float32)
    if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


class Embedder:
    """Pooled embeddings over a ModelRunner's weights (its dense-forward token cap and device)."""

    def __init__(self, runner, config: PoolerConfig):
        self.runner, self.config = runner, config
        self._fn = jax.jit(_embed_flat, static_argnums=(0, 1, 2, 3))

    def embed(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """One [D] f32 embedding per prompt (token ids), in order. Prompts are padded to power-of-two lengths and
        grouped, longest first, into calls of a power-of-two row count within the token cap."""
        cap = self.runner.max_score_tokens
        for i, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"input {i} is empty")
            if len(ids) > cap:
                raise ValueError(f"embeddings are computed for inputs of up to {cap} tokens (max_num_batched_tokens "
                                 f"and the memory kept free for the steps); input {i} has {len(ids)}")
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[np.ndarray | None] = [None] * len(prompts)
        start = 0
        while start < len(order):
            length = pow2_bucket(len(prompts[order[start]]), 16)
            rows = 1
            while rows * 2 * length <= cap and start + rows < len(order):
                rows *= 2
            group = order[start:start + rows]
            for i, row in zip(group, self._call(rows, length, [prompts[i] for i in group])):
                out[i] = row
            start += len(group)
        return out

    def _call(self, rows: int, length: int, prompts: list[list[int]]) -> np.ndarray:
        r = self.runner
        ids = np.zeros((rows, length), np.int32)
        lengths = np.ones(rows, np.int32)  # padding rows: one token, dropped below
        for i, p in enumerate(prompts):
            ids[i, :len(p)], lengths[i] = p, len(p)
        slots = np.full(rows * length, -1, np.int32) if r.lora_leaves else None  # the base model, no adapter
        emb = self._fn(r.graphdef, r.weights_tree, self.config.pooling_type, self.config.normalize,
                       jax.device_put(ids, r.device), jax.device_put(lengths, r.device), slots, *r.weights)
        return np.asarray(emb)[:len(prompts)]


def pair_texts(text_1, text_2) -> list[tuple[str, str]]:
    """vLLM's score pairing: one text_1 with each text_2 (1 to 1, 1 to N), or two lists entry by entry (N to N).
    Other lengths, or an empty side, raise ValueError naming the field."""
    first = [text_1] if isinstance(text_1, str) else list(text_1)
    second = [text_2] if isinstance(text_2, str) else list(text_2)
    for name, side in (("text_1", first), ("text_2", second)):
        if not side or any(not t for t in side):
            raise ValueError(f"{name} cannot be empty")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise ValueError(f"text_1 has {len(first)} entries and text_2 {len(second)}: give one text_1, or as many as "
                         f"text_2")
    return list(zip(first, second))


def unit_rows(vectors) -> np.ndarray:
    """Embeddings [n, D] scaled to unit length in float64 (a zero row stays zero): the score of a pair is then the
    dot product of its two rows, their cosine similarity."""
    v = np.asarray(vectors, np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
