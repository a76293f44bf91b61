"""Shared tiny set-ups for the fine-tuning tests (a 2-layer Llama / GPT-2 over the byte tokenizer)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ie_jax
from finetune.formats import tokenize_sft


_CACHE = {}


def tiny(preset="tiny-llama", dtype="float32", seed=0):
    """(model, tokenizer): a fresh copy of a cached random model (building one costs a compile)."""
    key = (preset, dtype, seed)
    if key not in _CACHE:
        _CACHE[key] = ie_jax.load_model(preset, dtype=dtype, seed=seed)
    model, tokenizer = _CACHE[key]
    return nnx.clone(model), tokenizer


def random_ids(key, shape, vocab=263):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab, jnp.int32)


def toy_sft_examples(tokenizer, n=48, seed=0):
    """A memorizable prompt -> completion task: five fixed answers."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(5))
        out.append(tokenize_sft({"prompt": f"Q{k}:", "completion": f" answer{k}"}, "prompt_completion", tokenizer))
    return out
