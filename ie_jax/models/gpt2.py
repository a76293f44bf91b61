"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused qkv projection, tanh-GELU MLP, tied output.

This is also the model for training a GPT from scratch. Module names follow HF's GPT2LMHeadModel (`h`, `attn.c_attn`,
`mlp.c_fc`, `ln_f`, ...). HF stores these weights as Conv1D [in, out], which is already our kernel layout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ie_jax.config import ModelConfig
from ie_jax.models.context import DenseCausal
from ie_jax.models.layers import Embed, LayerNorm, make_linear, project
from ie_jax.models.llama import scan_layers, stacked


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.c_attn = make_linear(D, 3 * D, bias=True, axes=("embed", "qkv"), dtype=dtype, rngs=rngs)
        self.c_proj = make_linear(D, D, bias=True, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x, positions, ctx, caches, layer):  # x [B, T, D]
        B, T, D = x.shape
        q, k, v = jnp.split(project(self.c_attn, x, ctx), 3, axis=-1)
        q, k, v = (t.reshape(B, T, self.num_heads, self.head_dim) for t in (q, k, v))  # [B, T, N, H]
        out, caches = ctx.attend(q, k, v, positions, caches, layer, scale=self.head_dim ** -0.5)
        return project(self.c_proj, out.reshape(B, T, D), ctx), caches


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.c_fc = make_linear(D, F, bias=True, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.c_proj = make_linear(F, D, bias=True, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.exact_gelu = cfg.hidden_act == "gelu"

    def __call__(self, x, ctx=None):
        h = jax.nn.gelu(project(self.c_fc, x, ctx), approximate=not self.exact_gelu)
        return project(self.c_proj, h, ctx)


class GPT2Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.attn = GPT2Attention(cfg, dtype=dtype, rngs=rngs)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = GPT2MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, ctx, caches, layer):
        h, caches = self.attn(self.ln_1(x), positions, ctx, caches, layer)
        x = x + h
        return x + self.mlp(self.ln_2(x), ctx), caches


class GPT2LMHeadModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if not cfg.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=False is not supported for gpt2 (HF ties the GPT-2 output layer)")
        self.config = cfg
        self.wte = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs, axes=(None, "embed"))
        self.h = stacked(lambda r: GPT2Block(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.remat = False

    STACK = "h"  # the attribute holding the stacked blocks

    def __call__(self, token_ids, positions=None, ctx=None, logits_indices=None, layer_states=None, hidden=False):
        """token_ids [B, T] -> (logits [B, T, V] f32, ctx). Positions default to 0..T-1; ctx to DenseCausal().

        logits_indices [B, R]: compute logits only at these token indices (-> [B, R, V]); the engine samples from
        one token per request, and the vocabulary projection of every token would cost more than the rest.
        hidden: the final normed hidden states [B, T, D] instead of logits (embeddings).
        """
        positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape) if positions is None \
            else positions
        ctx = DenseCausal() if ctx is None else ctx
        # Padding slots may carry positions outside the table; clamp them for the lookup (they are masked anyway).
        x = self.wte(token_ids) + self.wpe(jnp.clip(positions, 0, self.config.max_position_embeddings - 1))
        x, ctx = scan_layers(self.h, x, positions, ctx, remat=self.remat, layer_states=layer_states)
        if logits_indices is not None:
            x = jnp.take_along_axis(x, logits_indices[..., None], axis=1)  # [B, R, D]
        x = self.ln_f(x)
        return (x, ctx) if hidden else (self.wte.attend(x), ctx)
