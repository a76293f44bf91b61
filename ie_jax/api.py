"""The public entry points for research code: `load_model`, `forward`, and (re-exported) `generate`.

    model, tokenizer = ie_jax.load_model("path/to/hf_dir" or "preset", dtype="bfloat16", load_format="auto")
    logits = ie_jax.forward(model, token_ids)            # int32 [B, S] -> float32 [B, S, V]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ie_jax.config import ModelConfig
from ie_jax.hub import resolve_model
from ie_jax.presets import PRESETS, get_preset
from ie_jax.quant.linear import quant_config, quantize_model
from ie_jax.tokenizer import ByteTokenizer, SyntheticTokenizer, load_tokenizer
from ie_jax.weights import init_model, load_hf_weights

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16, "half": jnp.float16,
          "float": jnp.float32}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
BYTE_VOCAB = 263  # ByteTokenizer: 256 bytes + 7 specials


def resolve_dtype(dtype, config_dtype: str | None = None):
    if dtype == "auto":
        return DTYPES.get(config_dtype or "bfloat16", jnp.bfloat16)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{dtype=} is not supported; expected 'auto' or one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load_model(model: str | os.PathLike = "default", *, dtype="auto", load_format: str = "auto", mesh=None,
               rules="tp", seed: int = 0, progress: bool = True, quantization: str | None = None,
               revision: str | None = None, download_dir: str | None = None):
    """Load an HF checkpoint directory (or a Hub repo id, fetched first: ie_jax/hub.py, at `revision` into
    `download_dir`) or build a named preset. Returns (model, tokenizer).

    `quantization` ("int8", "int4" (round-to-nearest, AWQ's layout) or "fp8"; vLLM's `--quantization`) quantizes a
    float model's projections as it loads. A checkpoint that is already quantized loads in its own format, and naming
    a different one is an error.

    `load_format="dummy"` gives random weights (for benchmarks), from a preset name or a directory's config.json.
    Presets have no weights, so they are always random; their tokenizer is the byte tokenizer for byte-level presets
    and a `SyntheticTokenizer` (id i <-> word "w{i}") for real architectures. A directory without tokenizer files
    gives None.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"{load_format=} is not supported; expected one of {LOAD_FORMATS}")
    model = resolve_model(model, weights=load_format != "dummy", revision=revision, download_dir=download_dir)
    path = Path(model)
    if path.is_dir():
        hf_config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
        if hf_config is None:
            raise FileNotFoundError(f"{path} has no config.json; is it an HF checkpoint directory?")
        cfg = ModelConfig.from_hf(hf_config)
        dt = resolve_dtype(dtype, hf_config.get("torch_dtype") or hf_config.get("dtype"))
        if load_format == "dummy":
            m = init_model(_quantized(cfg, quantization), dtype=dt, mesh=mesh, rules=rules, seed=seed)
        else:
            target = _quantized(cfg, quantization)  # also checks the name against a quantized checkpoint
            m = load_hf_weights(path, cfg, dtype=dt, mesh=mesh, rules=rules, progress=progress)
            if target.quantization != cfg.quantization:  # a float checkpoint, quantized as it loads
                quantize_model(m, target.quantization)
        tokenizer = load_tokenizer(path) if (path / "tokenizer.json").exists() else None
        return m, tokenizer
    if str(model) in PRESETS:
        if load_format == "safetensors":
            raise ValueError(f"preset {model!r} has no weights to load; use load_format='dummy' or a directory")
        cfg = _quantized(get_preset(str(model)), quantization)
        m = init_model(cfg, dtype=resolve_dtype(dtype, "float32"), mesh=mesh, rules=rules, seed=seed)
        if cfg.vocab_size == BYTE_VOCAB:
            return m, ByteTokenizer()
        return m, SyntheticTokenizer(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
    raise ValueError(f"model={str(model)!r} is neither a checkpoint directory nor a preset; presets: {sorted(PRESETS)}."
                     f" A Hugging Face Hub name reads org/name.")


def _quantized(cfg: ModelConfig, quantization: str | None) -> ModelConfig:
    """cfg with the projections stored in `quantization` (None: as they are)."""
    if quantization is None:
        return cfg
    quant = quant_config(quantization)
    if cfg.quantization is not None:
        if cfg.quantization.method != quant.method:
            raise ValueError(f"the checkpoint is quantized with {cfg.quantization.method!r}, which does not match "
                             f"quantization={quantization!r}; leave it out to load the checkpoint's own format")
        return cfg
    return dataclasses.replace(cfg, quantization=quant)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, token_ids):
    logits, _ = nnx.merge(graphdef, state)(token_ids)
    return logits.astype(jnp.float32)


def forward(model: nnx.Module, token_ids) -> jax.Array:
    """Logits for a batch of full sequences: int32 [B, S] -> float32 [B, S, V] (causal, no padding)."""
    token_ids = jnp.asarray(token_ids, jnp.int32)
    if token_ids.ndim == 1:
        token_ids = token_ids[None]
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be [B, S]; got shape {token_ids.shape}")
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, token_ids)
