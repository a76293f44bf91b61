"""The Llama family in one implementation: Llama 2/3/3.x, Mistral, Qwen2/2.5 and Qwen3 differ only by config flags
(GQA ratio, qkv/o bias, q/k RMSNorm, rope scaling, sliding window, tied embeddings).

Module names follow HF (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...) so that weight loading is a
straight table. The decoder layers are stacked along a leading layer axis and run under `jax.lax.scan`: one layer
is traced and compiled once, whatever the depth.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ie_jax.config import ModelConfig
from ie_jax.models.context import DenseCausal, Paged
from ie_jax.models.layers import (Embed, Linear, RMSNorm, apply_rope, fuse_linears, make_linear, project,
                                  rope_attention_factor, rope_inv_freq)
from kernels_pallas import ops
from kernels_pallas import add_norm


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = make_linear(D, N * H, bias=cfg.qkv_bias, axes=("embed", "heads"), dtype=dtype, rngs=rngs,
                                  quant=cfg.quantization)
        self.k_proj = make_linear(D, K * H, bias=cfg.qkv_bias, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs,
                                  quant=cfg.quantization)
        self.v_proj = make_linear(D, K * H, bias=cfg.qkv_bias, axes=("embed", "kv_heads"), dtype=dtype, rngs=rngs,
                                  quant=cfg.quantization)
        self.o_proj = make_linear(N * H, D, bias=cfg.o_bias, axes=("heads", "embed"), dtype=dtype, rngs=rngs,
                                  quant=cfg.quantization)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, cfg.norm_eps, dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(H, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.qkv_proj = nnx.data(None)  # serving: q/k/v as one Linear (`fuse`)
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.qk_norm, self.sliding_window = cfg.qk_norm, cfg.sliding_window
        self.config = cfg  # static: rotary frequencies are recomputed (in numpy) at trace time
        self.softmax_scale = H ** -0.5 * rope_attention_factor(cfg) ** 2  # yarn scales q and k alike

    def fuse(self) -> bool:
        """Replace q/k/v by one Linear over their concatenated columns: one GEMM instead of three."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj, self.q_proj, self.k_proj, self.v_proj = fused, None, None, None
        return fused is not None

    def _qkv(self, x, ctx):
        if self.qkv_proj is None:
            return project(self.q_proj, x, ctx), project(self.k_proj, x, ctx), project(self.v_proj, x, ctx)
        q_cols, kv_cols = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return jnp.split(project(self.qkv_proj, x, ctx), [q_cols, q_cols + kv_cols], axis=-1)

    def _attend_rope(self, x, positions, inv_freq, ctx, caches, layer):
        """Serving steps the rope + KV write kernel takes (Paged.rope_in_write): the fused q/k/v projection as
        split-K partials (a plain Linear; else its output as one partial) go straight to it. None elsewhere."""
        B, T, D = x.shape
        proj, H = self.qkv_proj, self.head_dim
        C = self.num_heads + 2 * self.num_kv_heads
        plain = type(proj) is Linear and proj.bias is None
        cap = ops.rope_kv_splits(B * T) if plain else 1
        S = add_norm.num_splits(D, cap) or 1
        if not ctx.rope_in_write(jax.ShapeDtypeStruct((S, B * T, C, H), jnp.float32), self.num_kv_heads, caches,
                                 x.dtype):
            return None
        if S > 1:
            parts = add_norm.split_k_partials(x.reshape(B * T, D), proj.kernel[...], S)
        else:
            parts = project(proj, x, ctx)
        out, caches = ctx.attend_rope(parts.reshape(S, B * T, C, H), self.num_kv_heads, positions,
                                      inv_freq, caches, layer, dtype=x.dtype,
                                      scale=self.softmax_scale, sliding_window=self.sliding_window)
        return out.reshape(B, T, -1), caches

    def __call__(self, x, positions, ctx, caches, layer):  # x [B, T, D], positions [B, T]
        out, caches = self.attend(x, positions, ctx, caches, layer)
        return project(self.o_proj, out, ctx), caches

    def attend(self, x, positions, ctx, caches, layer):
        """Attention up to (not including) the o projection: ([B, T, N * H], caches)."""
        B, T, _ = x.shape
        inv_freq = rope_inv_freq(self.config)
        if isinstance(ctx, Paged) and self.qkv_proj is not None and not self.qk_norm:
            out = self._attend_rope(x, positions, inv_freq, ctx, caches, layer)  # rope inside the KV write
            if out is not None:
                return out
        q, k, v = self._qkv(x, ctx)
        q = q.reshape(B, T, self.num_heads, self.head_dim)  # [B, T, N, H]
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q, k, v = checkpoint_name(q, "attn_q"), checkpoint_name(k, "attn_k"), checkpoint_name(v, "attn_v")
        out, caches = ctx.attend(q, k, v, positions, caches, layer, scale=self.softmax_scale,
                                 sliding_window=self.sliding_window)
        return checkpoint_name(out, "attn_out").reshape(B, T, -1), caches


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, F, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = make_linear(D, F, bias=b, axes=("embed", "mlp"), dtype=dtype, rngs=rngs,
                                     quant=cfg.quantization)
        self.up_proj = make_linear(D, F, bias=b, axes=("embed", "mlp"), dtype=dtype, rngs=rngs,
                                   quant=cfg.quantization)
        self.down_proj = make_linear(F, D, bias=b, axes=("mlp", "embed"), dtype=dtype, rngs=rngs,
                                     quant=cfg.quantization)
        self.gate_up_proj = nnx.data(None)  # serving: gate/up as one Linear (`fuse`)

    def fuse(self) -> bool:
        """Replace gate/up by one Linear over their concatenated columns: one GEMM instead of two."""
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj, self.gate_proj, self.up_proj = fused, None, None
        return fused is not None

    def activation(self, x, ctx=None):
        """silu(gate) * up: the down projection's input."""
        if self.gate_up_proj is None:
            gate, up = project(self.gate_proj, x, ctx), project(self.up_proj, x, ctx)
        else:
            gate, up = jnp.split(project(self.gate_up_proj, x, ctx), 2, axis=-1)
        gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
        return jax.nn.silu(gate) * up

    def __call__(self, x, ctx=None):
        return project(self.down_proj, self.activation(x, ctx), ctx)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, ctx, caches, layer):
        if isinstance(x, tuple):  # serving's fused decode path (LlamaForCausalLM.fused_add_norm)
            return self._decode_call(x, positions, ctx, caches, layer)
        h, caches = self.self_attn(self.input_layernorm(x), positions, ctx, caches, layer)
        x = checkpoint_name(x + h, "resid_mid")
        return x + self.mlp(self.post_attention_layernorm(x), ctx), caches

    def _decode_call(self, carry, positions, ctx, caches, layer):
        """carry: (the residual x [B, T, D], the previous layer's down projection as split-K partials [S, B*T, D]
        f32, not yet added, and its LoRA update [B*T, D] f32 or None). Each residual add is folded into the RMSNorm
        after it, one kernel each (kernels_pallas/add_norm.py); the o and down projections leave their split-K
        partials to those kernels. Returns the same kind of carry."""
        x, pending, extra = carry
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        attn, mlp = self.self_attn, self.mlp
        x, h = ops.add_rmsnorm(x, pending, self.input_layernorm.weight[...], extra, eps=self.input_layernorm.eps)
        out, caches = attn.attend(h.reshape(B, T, D), positions, ctx, caches, layer)
        out = out.reshape(B * T, -1)
        o_kernel = dense(attn.o_proj).kernel[...]
        partials = add_norm.split_k_partials(out, o_kernel, add_norm_splits(o_kernel.shape[0]))
        norm = self.post_attention_layernorm
        x, y = ops.add_rmsnorm(x, partials, norm.weight[...], lora_delta(attn.o_proj, out, ctx), eps=norm.eps)
        d_kernel = dense(mlp.down_proj).kernel[...]
        act = mlp.activation(y, ctx)
        pending = add_norm.split_k_partials(act, d_kernel, add_norm_splits(d_kernel.shape[0]))
        return (x.reshape(B, T, D), pending, lora_delta(mlp.down_proj, act, ctx)), caches


def dense(proj):
    """The plain Linear under a serving LoRA wrapper (engine/lora.py's LoRASlots), else `proj` itself."""
    return proj.base if getattr(proj, "takes_lora_slots", False) else proj


def has_lora(proj, ctx) -> bool:
    """Whether `proj` adds LoRA updates in this step: a serving LoRA wrapper and a context carrying adapter slots."""
    return getattr(ctx, "lora_slots", None) is not None and getattr(proj, "takes_lora_slots", False)


def lora_delta(proj, x, ctx):
    """A LoRA-wrapped projection's low-rank update of x [M, in] in f32 (its adapters' share of the split-K sum the
    add + norm kernel takes), None for a plain one or a step without adapters."""
    return proj.delta(x, ctx.lora_slots, jnp.float32) if has_lora(proj, ctx) else None


def add_norm_splits(k: int) -> int:
    """K splits of a decode projection whose partials feed the fused add + norm (XLA's own choice at 4096 and
    14336: 8; IE_JAX_ADD_NORM_SPLITS caps it); 0 where K is not a multiple of 2 x 128."""
    return add_norm.num_splits(k, int(os.environ.get("IE_JAX_ADD_NORM_SPLITS", 8)))


@functools.partial(jax.jit, static_argnums=0)
def _layer_call(graphdef, layer_state, x, positions, ctx, layer):
    x, caches = nnx.merge(graphdef, layer_state)(x, positions, ctx, ctx.caches(), layer)
    return x, ctx.with_caches(caches)


def scan_layers(layers: nnx.Module, x, positions, ctx, remat: bool = False, layer_states=None):
    """Run stacked layers (leading layer axis on every variable) over x with lax.scan; returns (x, ctx).

    The context's caches (whole, all layers) ride in the scan carry and each layer updates its own slice in place;
    slicing them per layer as scan inputs/outputs would copy the entire KV cache every step.
    `layer_states` (serving): one state per layer, as separate arrays. The layers then run as straight-line code
    instead of a device loop, whose per-iteration launch round trips cost more than a decode step's own kernels.
    Every layer's kernels are identical (no slice of a stacked weight fused into them), so XLA compiles and
    autotunes each distinct kernel once, not once per layer. Each layer is one call of the same nested jit with a
    traced layer index, so a step traces and lowers one layer, not all of them (start-up time); XLA inlines the
    calls before optimizing, so the compiled step is the straight-line one. The stacked variables are not read.
    """
    if layer_states is not None:
        graphdef = nnx.graphdef(layers)
        for i, layer_state in enumerate(layer_states):
            x, ctx = _layer_call(graphdef, layer_state, x, positions, ctx, jnp.int32(i))
        return x, ctx
    graphdef, state = nnx.split(layers)
    num_layers = jax.tree.leaves(state)[0].shape[0]

    def body(carry, xs):
        x, caches = carry
        layer_state, layer = xs
        x, caches = nnx.merge(graphdef, layer_state)(x, positions, ctx, caches, layer)
        return (x, caches), None

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    (x, caches), _ = jax.lax.scan(body, (x, ctx.caches()), (state, jnp.arange(num_layers)))
    return x, ctx.with_caches(caches)


def fuse_projections(model: nnx.Module) -> int:
    """Serving: every module with a `fuse()` joins its projections that share an input (q/k/v, gate/up) into one
    Linear, in place; returns how many did. Weight loading, LoRA and checkpoints keep the separate HF modules."""
    return sum(m.fuse() for _, m in list(nnx.iter_modules(model)) if hasattr(m, "fuse"))


def stacked(make, num_layers: int, rngs: nnx.Rngs):
    """Build `num_layers` copies of a module as one module whose variables have a leading layer axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs):
        return make(rngs)

    return build(rngs)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = stacked(lambda r: DecoderLayer(cfg, dtype=dtype, rngs=r), cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = make_linear(cfg.hidden_size, cfg.vocab_size, bias=False, axes=("embed", "vocab"),
                                       dtype=dtype, rngs=rngs)
        self.remat = False  # gradient checkpointing per layer (training)

    STACK = "layers"  # the attribute holding the stacked decoder layers

    def fused_add_norm(self, x, ctx) -> int:
        """Serving steps of <= ops.ADD_NORM_MAX_TOKENS tokens where the Pallas kernels run: every residual add is
        folded into the RMSNorm after it (DecoderLayer._decode_call). Returns the down projection's K splits (the
        carry's partials), 0 for the plain path: training and reference contexts (the kernel has no VJP),
        quantized or biased o/down projections, shapes the kernel does not take (add_norm.supported). LoRA-wrapped
        o/down projections keep it: their adapters' updates are one more f32 term of the sums (`lora_delta`)."""
        if not isinstance(ctx, Paged) or x.shape[0] * x.shape[1] > ops.ADD_NORM_MAX_TOKENS:
            return 0
        o_proj, down_proj = dense(self.layers.self_attn.o_proj), dense(self.layers.mlp.down_proj)
        if any(type(p) is not Linear or p.bias is not None for p in (o_proj, down_proj)):
            return 0
        splits = add_norm_splits(o_proj.kernel.shape[-2]), add_norm_splits(down_proj.kernel.shape[-2])
        fits = all(add_norm.supported(x.shape[-1], s) for s in splits)
        return splits[1] if fits and ops.add_norm_active() else 0

    def __call__(self, token_ids, positions=None, ctx=None, logits_indices=None, layer_states=None, hidden=False):
        """token_ids [B, T] -> (logits [B, T, V] f32, ctx). Positions default to 0..T-1; ctx to DenseCausal().

        logits_indices [B, R]: compute logits only at these token indices (-> [B, R, V]); the engine samples from
        one token per request, and the vocabulary projection of every token would cost more than the rest.
        hidden: the final normed hidden states [B, T, D] instead of logits (embeddings).
        """
        positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape) if positions is None \
            else positions
        ctx = DenseCausal() if ctx is None else ctx
        x = self.embed_tokens(token_ids)  # [B, T, D]
        fused = self.fused_add_norm(x, ctx)
        if fused:  # (residual, pending partials, pending LoRA update or None): the first layer adds zeros
            B, T, D = x.shape
            lora = has_lora(self.layers.mlp.down_proj, ctx)
            x = (x, jnp.zeros((fused, B * T, D), jnp.float32), jnp.zeros((B * T, D), jnp.float32) if lora else None)
        x, ctx = scan_layers(self.layers, x, positions, ctx, remat=self.remat, layer_states=layer_states)
        if fused:
            (x, pending, extra), norm = x, self.norm
            B, T, D = x.shape
            x = ops.add_rmsnorm(x.reshape(B * T, D), pending, norm.weight[...], extra,
                                eps=norm.eps)[1].reshape(B, T, D)
        if logits_indices is not None:
            x = jnp.take_along_axis(x, logits_indices[..., None], axis=1)  # [B, R, D]
        if not fused:
            x = self.norm(x)
        if hidden:
            return x, ctx
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(x), ctx
        return self.lm_head(x, out_dtype=jnp.float32), ctx
