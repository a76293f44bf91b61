"""Named model configurations: real architectures (for `--load-format dummy` benchmarks and from-scratch
training) and tiny ones (tests and the embedded default model). Values mirror the public HF config.json files."""
from __future__ import annotations

from ie_jax.config import ModelConfig, RopeScaling

_LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                  num_kv_heads=8, head_dim=128, intermediate_size=14336, max_position_embeddings=8192,
                  norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=(128001, 128009))

PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(**_LLAMA3_8B),
    "llama-3.1-8b": ModelConfig(**{**_LLAMA3_8B, "max_position_embeddings": 131072, "rope_scaling": RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)}),
    "llama-3.2-1b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, intermediate_size=8192, max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=(128001, 128008, 128009)),
    "llama-2-7b": ModelConfig(
        model_type="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        head_dim=128, intermediate_size=11008, max_position_embeddings=4096, norm_eps=1e-5, bos_token_id=1,
        eos_token_id=(2,)),
    "mistral-7b": ModelConfig(
        model_type="mistral", vocab_size=32768, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, max_position_embeddings=32768, norm_eps=1e-5, rope_theta=1e6,
        bos_token_id=1, eos_token_id=(2,)),
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        head_dim=128, intermediate_size=18944, max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1e6,
        qkv_bias=True, eos_token_id=(151645,)),
    "qwen3-0.6b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
        head_dim=128, intermediate_size=3072, max_position_embeddings=40960, norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True, qk_norm=True, bos_token_id=151643, eos_token_id=(151645,)),
    "gpt2": ModelConfig(
        model_type="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
        head_dim=64, intermediate_size=3072, max_position_embeddings=1024, tie_word_embeddings=True,
        qkv_bias=True, o_bias=True, mlp_bias=True, hidden_act="gelu_new", bos_token_id=50256, eos_token_id=(50256,)),
    # A GPT small enough to train from scratch on a laptop CPU in minutes (byte tokenizer vocabulary).
    "gpt2-small-ish": ModelConfig(
        model_type="gpt2", vocab_size=263, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6,
        head_dim=64, intermediate_size=1536, max_position_embeddings=1024, tie_word_embeddings=True,
        qkv_bias=True, o_bias=True, mlp_bias=True, hidden_act="gelu_new", bos_token_id=257, eos_token_id=(258,)),
    # The embedded default model: Llama architecture over the byte tokenizer (ids 0-255 bytes, 256-262 specials).
    "default": ModelConfig(
        model_type="llama", vocab_size=263, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
        head_dim=32, intermediate_size=768, max_position_embeddings=2048, norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=257, eos_token_id=(258,)),
    # Tiny test models.
    "tiny-llama": ModelConfig(
        model_type="llama", vocab_size=263, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=512, bos_token_id=257, eos_token_id=(258,)),
    "tiny-gpt2": ModelConfig(
        model_type="gpt2", vocab_size=263, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=16, intermediate_size=256, max_position_embeddings=512, tie_word_embeddings=True, qkv_bias=True,
        o_bias=True, mlp_bias=True, hidden_act="gelu_new", bos_token_id=257, eos_token_id=(258,)),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]
