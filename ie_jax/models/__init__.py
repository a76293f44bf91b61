"""Model families. `build_model(cfg, dtype, rngs)` picks the implementation from the config."""
import jax.numpy as jnp
from flax import nnx

from ie_jax.config import ModelConfig
from ie_jax.models.context import ContiguousCache, DenseCausal
from ie_jax.models.gpt2 import GPT2LMHeadModel
from ie_jax.models.llama import LlamaForCausalLM


def build_model(cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None) -> nnx.Module:
    rngs = nnx.Rngs(0) if rngs is None else rngs
    cls = GPT2LMHeadModel if cfg.is_gpt2 else LlamaForCausalLM
    return cls(cfg, dtype=dtype, rngs=rngs)


__all__ = ["build_model", "ContiguousCache", "DenseCausal", "GPT2LMHeadModel", "LlamaForCausalLM"]
