"""LoRA transform: exact identity at B = 0, targeting, scaling, merging, and training changes only the adapters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ie_jax
from finetune.lora import LoraConfig, LoRAParam, apply_lora, lora_delta, lora_modules, merge_lora, select_targets
from ft_helpers import random_ids, tiny


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_zero_b_gives_exact_base_logits(preset, dropout):
    model, _ = tiny(preset)
    ids = random_ids(1, (2, 11))
    expected = ie_jax.forward(model, ids)
    apply_lora(model, LoraConfig(r=4, dropout=dropout))
    got = ie_jax.forward(model, ids)
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_default_targets_are_attention_and_mlp_linears():
    model, _ = tiny("tiny-llama")
    paths = apply_lora(model, LoraConfig(r=2))
    assert paths == sorted(f"layers.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                   "mlp.down_proj"))
    a = model.layers.self_attn.q_proj.lora_a[...]
    b = model.layers.self_attn.q_proj.lora_b[...]
    assert a.shape == (2, 64, 2) and b.shape == (2, 2, 64)  # stacked [L, in, r], [L, r, out]
    assert float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(64) and float(jnp.std(a)) > 0  # Kaiming-uniform bound
    assert not np.any(np.asarray(b))


def test_target_by_name_list_and_regex():
    model, _ = tiny("tiny-llama")
    got = sorted(".".join(p) for p in select_targets(model, ("q_proj", "v_proj")))
    assert got == ["layers.self_attn.q_proj", "layers.self_attn.v_proj"]
    got = sorted(".".join(p) for p in select_targets(model, r"model\.layers\.\d+\.mlp\.(up|down)_proj"))
    assert got == ["layers.mlp.down_proj", "layers.mlp.up_proj"]
    assert [".".join(p) for p in select_targets(model, ("lm_head",))] == ["lm_head"]


def test_target_errors():
    model, _ = tiny("tiny-llama")
    with pytest.raises(ValueError, match="matched no linear layer"):
        apply_lora(model, LoraConfig(target_modules=("qkv_proj",)))
    with pytest.raises(ValueError, match="selects layers \\[1\\]"):
        apply_lora(model, LoraConfig(target_modules=r"model\.layers\.1\.self_attn\.q_proj"))
    apply_lora(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_lora(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="r=0"):
        LoraConfig(r=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_output_matches_formula(use_rslora):
    model, _ = tiny("tiny-llama")
    apply_lora(model, LoraConfig(r=4, alpha=6.0, use_rslora=use_rslora, init_lora_weights=False,
                                 target_modules=("lm_head",)))
    module = model.lm_head
    assert module.scaling == pytest.approx(6.0 / (2.0 if use_rslora else 4.0))
    x = jax.random.normal(jax.random.key(3), (5, 64))
    a, b = np.asarray(module.lora_a[...], np.float64), np.asarray(module.lora_b[...], np.float64)
    kernel = np.asarray(module.base.kernel[...], np.float64)
    expected = np.asarray(x, np.float64) @ kernel + module.scaling * (np.asarray(x, np.float64) @ a @ b)
    np.testing.assert_allclose(np.asarray(module(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_merge_matches_base_plus_adapter(preset):
    model, _ = tiny(preset)
    apply_lora(model, LoraConfig(r=4, init_lora_weights=False))
    ids = random_ids(2, (2, 13))
    expected = ie_jax.forward(model, ids)
    before = ie_jax.forward(nnx.merge(*nnx.split(model)), ids)  # the adapter must change something
    deltas = [float(jnp.max(jnp.abs(lora_delta(m)))) for _, m in lora_modules(model)]
    assert min(deltas) > 1e-3
    merge_lora(model)
    assert not lora_modules(model)
    np.testing.assert_allclose(np.asarray(ie_jax.forward(model, ids)), np.asarray(expected), atol=2e-5, rtol=1e-5)
    assert np.array_equal(np.asarray(before), np.asarray(expected))


def test_only_lora_params_change_and_loss_drops():
    from finetune.data import DataConfig, sft_dataset
    from finetune.trainer import TrainConfig, Trainer
    from ft_helpers import toy_sft_examples

    model, tok = tiny("tiny-llama")
    apply_lora(model, LoraConfig(r=8, alpha=16))
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(LoRAParam)))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, LoRAParam))
    trainer = Trainer(model, TrainConfig(max_steps=25, learning_rate=1e-2, compute_dtype="float32",
                                         lr_schedule="constant"))
    assert len(jax.tree.leaves(trainer.params)) == 14  # 7 targets x (A, B): nothing else reaches the optimizer
    it = iter(sft_dataset(toy_sft_examples(tok), DataConfig(seq_len=32, batch_size=4, num_epochs=None)))
    losses = [float(trainer.train_step(next(it))["loss"]) for _ in range(25)]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.5, losses
    trained = trainer.model()
    frozen_after = jax.tree.map(np.asarray, nnx.state(trained, nnx.Not(LoRAParam)))
    assert jax.tree.all(jax.tree.map(np.array_equal, frozen_before, frozen_after))
    lora_after = jax.tree.map(np.asarray, nnx.state(trained, LoRAParam))
    changed = jax.tree.map(lambda x, y: not np.array_equal(x, y), lora_before, lora_after)
    assert all(jax.tree.leaves(changed))
