"""NF4 with double quantization (error bounds, exact levels, storage) and QLoRA training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ie_jax
from finetune.lora import LoraConfig, apply_lora, merge_lora
from finetune.qlora import NF4Linear, init_nf4_model, quantize_base
from ie_jax.presets import get_preset
from ie_jax.quant.nf4 import NF4_LEVELS, dequantize_nf4, max_abs_error, nf4_bytes, quantize_nf4
from ft_helpers import random_ids, tiny, toy_sft_examples


@pytest.mark.parametrize("shape", [(64, 96), (3, 128, 64)])
def test_nf4_error_within_bound(shape):
    w = jax.random.normal(jax.random.key(0), shape) * 0.05
    w = w.at[..., 0, 0].set(0.9)  # an outlier: its block's other values lose precision, but stay in bound
    q = quantize_nf4(w)
    err = np.abs(np.asarray(dequantize_nf4(q)) - np.asarray(w))
    bound = np.asarray(max_abs_error(w, q))
    assert (err <= bound + 1e-7).all()
    # The bound means something: 15.2% of the block maximum (half the widest level gap, -1..-0.696) plus the
    # int8 step of the block maxima (the outlier widens it to ~0.003 in its group).
    blocks = np.abs(np.asarray(w)).reshape(-1, 64).max(-1)
    assert (bound.reshape(-1, 64).max(-1) <= 0.16 * blocks + 0.004).all()
    assert np.mean(err) < 0.1 * np.mean(np.abs(np.asarray(w)))


def test_nf4_levels_are_exact_and_codes_pack_two_per_byte():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 16, (32, 64))
    idx[:, 0] = 15  # every block reaches +1, so its maximum is exactly 1
    w = NF4_LEVELS[idx]
    q = quantize_nf4(w)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (32 * 64 // 2,)
    assert np.asarray(q.codes)[0] == (idx[0, 0] << 4) | idx[0, 1]
    np.testing.assert_allclose(np.asarray(dequantize_nf4(q)), w, atol=1e-6)


def test_nf4_storage_is_about_four_bits():
    w = jax.random.normal(jax.random.key(1), (512, 512))
    bits = nf4_bytes(quantize_nf4(w)) * 8 / w.size
    assert 4.0 < bits < 4.2
    with pytest.raises(ValueError, match="block_size=64"):
        quantize_nf4(jnp.ones((3, 7)))


def test_qlora_forward_is_the_dequantized_model_and_merge_matches():
    model, _ = tiny("tiny-llama", dtype="bfloat16")
    ids = random_ids(4, (2, 10))
    dense = ie_jax.forward(model, ids)
    paths = quantize_base(model)
    assert isinstance(model.layers.mlp.up_proj, NF4Linear) and len(paths) == 7
    out = ie_jax.forward(model, ids)
    # The same function as a dense model holding the dequantized kernels, and close to the original one.
    expected = nnx.clone(model)
    for path in paths:
        parent = expected
        for p in path.split(".")[:-1]:
            parent = getattr(parent, p)
        setattr(parent, path.split(".")[-1], getattr(parent, path.split(".")[-1]).dense())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ie_jax.forward(expected, ids)), atol=1e-6)
    assert float(jnp.mean(jnp.abs(out - dense))) < 0.3 * float(jnp.mean(jnp.abs(dense)))
    apply_lora(model, LoraConfig(r=4, init_lora_weights=False))
    with_adapter = ie_jax.forward(model, ids)
    merge_lora(model)  # dequantize + fold: a dense model computing the same function (up to bf16 rounding)
    np.testing.assert_allclose(np.asarray(ie_jax.forward(model, ids)), np.asarray(with_adapter), atol=0.03)
    m2, _ = tiny("tiny-llama")
    apply_lora(m2, LoraConfig(r=2))
    with pytest.raises(ValueError, match="before apply_lora"):
        quantize_base(m2)


def test_init_nf4_model_builds_a_working_model():
    model = init_nf4_model(get_preset("tiny-gpt2"), dtype=jnp.bfloat16)
    assert isinstance(model.h.attn.c_attn, NF4Linear) and model.h.attn.c_attn.kernel_shape == (2, 64, 192)
    logits = ie_jax.forward(model, random_ids(5, (1, 8)))
    assert logits.shape == (1, 8, 263) and bool(jnp.isfinite(logits).all())


def test_qlora_training_loss_drops():
    from finetune.data import DataConfig, sft_dataset
    from finetune.trainer import TrainConfig, Trainer

    model, tok = tiny("tiny-llama", dtype="bfloat16")
    quantize_base(model)
    apply_lora(model, LoraConfig(r=8, alpha=16))
    trainer = Trainer(model, TrainConfig(method="qlora", max_steps=20, learning_rate=1e-2, lr_schedule="constant"))
    it = iter(sft_dataset(toy_sft_examples(tok), DataConfig(seq_len=32, batch_size=4, num_epochs=None)))
    losses = [float(trainer.train_step(next(it))["loss"]) for _ in range(20)]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:3]) - 0.5, losses
