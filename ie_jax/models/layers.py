"""Building blocks shared by the model families: Linear, Embed, RMSNorm, LayerNorm and rotary embeddings.

Every parameter carries logical axis names in its `axes` metadata (see ie_jax/sharding.py); the names are
  vocab, embed, heads (N*H), kv_heads (K*H), mlp, norm.
Layers compute in the dtype of their input with f32 accumulation; norms and rotary math run in f32, as HF does.
This module does not know about weight formats beyond plain dense arrays: quantized Linear variants replace
`Linear` through `make_linear` without the model code changing.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ie_jax.config import ModelConfig, QuantConfig


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] (the transpose of an HF nn.Linear weight)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, axes: tuple[str | None, str | None],
                 dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype), axes=axes[1:]) if bias else None

    def __call__(self, x, out_dtype=None):  # [..., in] -> [..., out]
        out_dtype = out_dtype or x.dtype
        kernel = self.kernel[...].astype(x.dtype)
        if self.bias is None:  # the GEMM accumulates in f32 and writes out_dtype itself: no f32 [..., out] pass
            return jnp.dot(x, kernel, preferred_element_type=out_dtype)
        y = jnp.dot(x, kernel, preferred_element_type=jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(out_dtype)

    @classmethod
    def concatenate(cls, parts: list["Linear"]) -> "Linear":
        """One Linear whose output columns are the parts' outputs side by side (same input, same dtype).
        The output axis loses its sharding name: a split of the concatenation is not a split of each part."""
        kernel = jnp.concatenate([p.kernel[...] for p in parts], axis=-1)  # [..., in, out]
        has_bias = parts[0].bias is not None
        # Built abstractly (no random init of the big kernel), then given the concatenated arrays.
        self = nnx.eval_shape(lambda: cls(1, 1, bias=has_bias, axes=(None, None), dtype=kernel.dtype,
                                          rngs=nnx.Rngs(0)))
        axes = tuple(parts[0].kernel.get_metadata("axes", (None, None)))[:-1] + (None,)
        self.kernel = nnx.Param(kernel, axes=axes)
        if has_bias:
            self.bias = nnx.Param(jnp.concatenate([p.bias[...] for p in parts], axis=-1), axes=(None,))
        return self


def project(linear: nnx.Module, x, ctx=None, out_dtype=None):
    """`linear(x)`. A layer serving several LoRA adapters in one step (engine/lora.py, `takes_lora_slots`) also
    takes the adapter slot of each token, which the serving context carries (`lora_slots`)."""
    slots = getattr(ctx, "lora_slots", None)
    if slots is not None and getattr(linear, "takes_lora_slots", False):
        return linear(x, out_dtype, lora_slots=slots)
    return linear(x, out_dtype)


def make_linear(in_features: int, out_features: int, *, bias: bool, axes, dtype, rngs: nnx.Rngs,
                quant: QuantConfig | None = None) -> nnx.Module:
    """The one place a weight format picks its Linear class: dense, or ie_jax/quant/linear.py's class for `quant`
    (random weights in that format; loading replaces them). Every class has Linear's call contract."""
    if quant is None:
        return Linear(in_features, out_features, bias=bias, axes=axes, dtype=dtype, rngs=rngs)
    from ie_jax.quant.linear import linear_class  # the quantized layers import this module
    return linear_class(quant).random(in_features, out_features, bias=bias, axes=axes, dtype=dtype, rngs=rngs,
                                      quant=quant)


def fuse_linears(parts: list[nnx.Module]) -> nnx.Module | None:
    """The parts (Linear layers over the same input) as one GEMM, or None where they cannot be: different classes,
    a class without `concatenate` (adapters, some formats), or weights spread over several devices."""
    cls = type(parts[0])
    if any(type(p) is not cls for p in parts) or not hasattr(cls, "concatenate"):
        return None
    arrays = jax.tree.leaves(nnx.state(parts))
    if any(len(x.sharding.device_set) > 1 for x in arrays if isinstance(x, jax.Array)):
        return None
    return cls.concatenate(parts)


class Embed(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, dtype, rngs: nnx.Rngs, axes=("vocab", "embed")):
        self.embedding = nnx.Param(_normal(rngs, (num_embeddings, features), dtype), axes=axes)

    def __call__(self, ids):  # [B, T] -> [B, T, D]
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x):  # [B, T, D] -> [B, T, V] f32: the tied output projection
        return jnp.dot(x, self.embedding[...].astype(x.dtype).T, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        del rngs
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        del rngs
        self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (f32), with linear, llama3 or yarn scaling applied as HF computes them."""
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32)
    if rs.rope_type == "linear":
        return (inv_freq / rs.factor).astype(np.float32)
    if rs.rope_type == "yarn":
        # dimensions that turn more than beta_fast times over the original length keep their frequency, those
        # under beta_slow times are interpolated (divided by factor), a linear ramp in between
        def dim_of(rotations):  # the dimension that turns `rotations` times over the original length
            return H * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(cfg.rope_theta))
        low, high = dim_of(rs.beta_fast), dim_of(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, H - 1)
        ramp = np.clip((np.arange(H // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
        return (inv_freq / rs.factor * ramp + inv_freq * (1 - ramp)).astype(np.float32)
    # llama3: long wavelengths slow down by `factor`, short ones stay, a smooth blend in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """yarn's scale of cos and sin (1 otherwise). Both q and k carry it, so the attention folds its square into
    the softmax scale instead: the KV cache holds k rotated without it."""
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type != "yarn":
        return 1.0
    if rs.attention_factor is not None:
        return float(rs.attention_factor)

    def mscale(m=1.0):
        return 1.0 if rs.factor <= 1 else 0.1 * m * math.log(rs.factor) + 1.0
    if rs.mscale and rs.mscale_all_dim:
        return mscale(rs.mscale) / mscale(rs.mscale_all_dim)
    return mscale()


def apply_rope(x, positions, inv_freq):
    """Rotate x [B, T, N, H] by positions [B, T] (HF "rotate_half" layout: pairs are (i, i + H/2))."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
