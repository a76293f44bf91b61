"""ie-jax: LLM inference and fine-tuning in JAX, for NVIDIA Hopper first.

    import ie_jax
    model, tokenizer = ie_jax.load_model("path/to/hf_dir" or "preset", dtype="bfloat16", load_format="auto")
    logits = ie_jax.forward(model, token_ids)          # int32 [B, S] -> float32 [B, S, V]
    outs = ie_jax.generate(model, tokenizer, prompts, ie_jax.SamplingParams(temperature=0.0, max_tokens=16))
"""
from ie_jax.api import forward, load_model
from ie_jax.config import ModelConfig
from ie_jax.generate import CompletionOutput, GenerateOutput, generate
from ie_jax.presets import PRESETS
from ie_jax.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["CompletionOutput", "GenerateOutput", "ModelConfig", "PRESETS", "SamplingParams", "forward", "generate",
           "load_model"]
