"""Static scales for an fp8 (e4m3) KV cache: read from a checkpoint, written into one, or calibrated on text.

An fp8 cache stores K / k_scale and V / v_scale, saturated to +-448 (e4m3's largest finite value). With a scale of
1 (no calibration) every |K| or |V| above 448 is clipped. FP8 checkpoints made for vLLM carry one scale per layer
for K and one for V, under any of these names (all read here; written as the first):

    model.layers.{i}.self_attn.k_scale / .v_scale              llm-compressor (compressed-tensors kv_cache_scheme)
    model.layers.{i}.self_attn.kv_scale                        older: one scale for both
    model.layers.{i}.self_attn.k_proj.output_scale / v_proj.   AutoFP8
    model.layers.{i}.self_attn.k_proj.k_scale / v_proj.v_scale ModelOpt

The model carries them as `model.kv_cache_scales`: (k scales, v scales), one float per layer, or None. The engine
uses them when it runs an fp8 cache (`--kv-cache-dtype fp8`); a 16-bit cache ignores them, as vLLM does.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

E4M3_MAX = 448.0
KV_SCALE_NAME = re.compile(r"model\.layers\.(?P<layer>\d+)\.self_attn\.(?:attn\.)?"
                           r"(?:(?P<proj>[kv])_proj\.(?:output_scale|[kv]_scale)|(?P<which>[kv]|kv)_scale)$")


def match(name: str) -> tuple[int, str] | None:
    """(layer, "k" | "v" | "kv") for a KV-cache scale tensor's name, else None."""
    m = KV_SCALE_NAME.match(name)
    if m is None:
        return None
    return int(m["layer"]), m["proj"] or m["which"]


def scale_value(name: str, value) -> float:
    """One positive, finite per-layer scale from a checkpoint tensor (a scalar or a one-element array)."""
    arr = np.asarray(value, np.float32)
    if arr.size != 1:
        raise ValueError(f"{name}: KV-cache scale of shape {arr.shape}; only one scale per layer (per tensor) is "
                         f"supported")
    v = float(arr.reshape(()))
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: KV-cache scale {v} must be a positive, finite number")
    return v


def assemble(found: dict[tuple[int, str], float], num_layers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """{(layer, "k" | "v" | "kv"): scale} from a checkpoint -> (k scales, v scales) for every layer. A checkpoint
    has them for every layer or for none: some layers alone raise ValueError naming what is missing."""
    k, v = [None] * num_layers, [None] * num_layers
    for (layer, which), value in found.items():
        if layer >= num_layers:
            raise ValueError(f"KV-cache scale for layer {layer}, but the model has {num_layers} layers")
        if which in ("k", "kv"):
            k[layer] = value
        if which in ("v", "kv"):
            v[layer] = value
    missing = [f"model.layers.{i}.self_attn.{w}_scale" for i in range(num_layers) for w, s in (("k", k), ("v", v))
               if s[i] is None]
    if missing:
        raise ValueError(f"the checkpoint has KV-cache scales for some layers only; missing {len(missing)}, e.g. "
                         f"{missing[:4]}")
    return tuple(k), tuple(v)


def hf_tensors(model) -> dict[str, np.ndarray]:
    """The model's KV-cache scales as checkpoint tensors (f32 scalars), or {} when it has none."""
    scales = getattr(model, "kv_cache_scales", None)
    if scales is None:
        return {}
    return {f"model.layers.{i}.self_attn.{w}_scale": np.asarray(s, np.float32)
            for w, per_layer in zip("kv", scales) for i, s in enumerate(per_layer)}


def cache_scales(model, num_kv_heads: int, scales=None) -> tuple[jax.Array, jax.Array]:
    """(k_scale, v_scale) [L, K] f32 for the engine's fp8 cache: `scales` (per layer), else the model's, else
    ones, on every kv-head."""
    L = model.config.num_layers
    scales = scales or getattr(model, "kv_cache_scales", None) or ((1.0,) * L, (1.0,) * L)
    return tuple(jnp.broadcast_to(jnp.asarray(s, jnp.float32)[:, None], (L, num_kv_heads)) for s in scales)


def calibrate(model, rows: np.ndarray, batch_size: int = 8) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-layer scales amax / 448 of the K and V a dense forward writes over `rows` [B, S] of token ids (K after
    rope, as the cache holds it), so that the largest value seen maps to e4m3's largest."""
    from ie_jax.models.context import ContiguousCache
    cfg = model.config
    graphdef, state = nnx.split(model)

    @jax.jit
    def amax(state, tokens):
        B, S = tokens.shape
        ctx = ContiguousCache.allocate(cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
        _, ctx = nnx.merge(graphdef, state)(tokens, jnp.broadcast_to(jnp.arange(S), (B, S)), ctx)
        return jnp.abs(ctx.k).max(axis=(1, 2, 3, 4)), jnp.abs(ctx.v).max(axis=(1, 2, 3, 4))

    k = v = np.zeros(cfg.num_layers, np.float32)
    for start in range(0, rows.shape[0], batch_size):
        ka, va = amax(state, jnp.asarray(rows[start:start + batch_size], jnp.int32))
        k, v = np.maximum(k, np.asarray(ka)), np.maximum(v, np.asarray(va))
    tiny = np.finfo(np.float32).tiny  # a layer whose K or V is all zeros keeps a usable scale
    return tuple(float(max(a / E4M3_MAX, tiny)) for a in k), tuple(float(max(a / E4M3_MAX, tiny)) for a in v)


def calculate(model, tokenizer, num_samples: int = 8, seq_len: int = 512):
    """vLLM's --calculate-kv-scales, done once at start-up: `calibrate` over rows of the bundled calibration text
    (the project's README and docs) rather than over the first requests' tokens."""
    from ie_jax.quant.calibration import bundled_calibration_text, calibration_ids
    text, _ = bundled_calibration_text()
    rows = calibration_ids(tokenizer, text, num_samples, seq_len, model.config.max_position_embeddings)
    return calibrate(model, rows)
