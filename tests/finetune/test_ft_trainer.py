"""Trainer: accumulation equals a large batch, a mesh of 8 CPU devices equals one device, kill/resume is
bit-identical, full fine-tuning from scratch learns, schedules, and the CLI end to end."""
import importlib.util
import json
from pathlib import Path

import jax
import jax.extend
import numpy as np
import pytest

from finetune.data import DataConfig, sft_dataset
from finetune.lora import LoraConfig, apply_lora
from finetune.loop import LoopConfig, fit, read_metrics
from finetune.trainer import TrainConfig, Trainer, make_schedule
from ie_jax.sharding import make_mesh
from ft_helpers import tiny, toy_sft_examples

ROOT = Path(__file__).resolve().parents[2]


def lora_trainer(mesh=None, dropout=0.0, **kw):
    model, tok = tiny("tiny-llama")
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, init_lora_weights=False))
    cfg = dict(max_steps=8, learning_rate=5e-3, compute_dtype="float32", max_grad_norm=None) | kw
    return Trainer(model, TrainConfig(**cfg), mesh=mesh), tok


def test_the_train_step_compiles_once():
    """Params, frozen state and optimizer state start on the device, as the step's outputs are: the second step
    reuses the first step's executable."""
    trainer, tok = lora_trainer()
    it = iter(sft_dataset(toy_sft_examples(tok), DataConfig(seq_len=24, batch_size=2, grad_accum=1)))
    losses = [float(trainer.train_step(next(it))["loss"]) for _ in range(3)]
    assert trainer._train._cache_size() == 1
    assert all(np.isfinite(losses)) and losses[0] != losses[2]


def test_gradient_accumulation_equals_one_large_batch():
    # A large Adam epsilon makes the first update linear in the gradient, so params compare the gradients.
    t1, tok = lora_trainer(adam_eps=1.0)
    t2, _ = lora_trainer(adam_eps=1.0)
    batch = next(iter(sft_dataset(toy_sft_examples(tok), DataConfig(seq_len=24, batch_size=2, grad_accum=2))))
    big = {k: v.reshape(1, 4, *v.shape[2:]) for k, v in batch.items()}
    m1, m2 = t1.train_step(batch), t2.train_step(big)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(t1.params), jax.tree.leaves(t2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-8)


def test_mesh_of_eight_cpu_devices_matches_one_device():
    assert len(jax.devices()) == 8
    single, tok = lora_trainer()
    sharded, _ = lora_trainer(mesh=make_mesh(model=2, data=4))
    spec = jax.tree.leaves(sharded.params)[0].sharding.spec  # layers.mlp.down_proj.lora_a [L, mlp, r]
    assert "model" in tuple(spec)
    it = iter(sft_dataset(toy_sft_examples(tok), DataConfig(seq_len=24, batch_size=4, num_epochs=None)))
    for _ in range(2):
        batch = next(it)
        a, b = single.train_step(batch), sharded.train_step(batch)
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


class KilledAfter:
    """An iterator that dies after n batches, as a killed process would (with grain's state methods)."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __next__(self):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


@pytest.fixture
def compilation_cache(tmp_path):
    """JAX's persistent compilation cache, in this test's own directory and for this test alone: each run below
    builds a new Trainer, whose train step would compile afresh; with the cache the later runs load the same
    executable from disk."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    before = jax.config.jax_compilation_cache_dir
    cc.reset_cache()  # the cache is set up once per process: start it over with the directory set
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    try:
        yield
    finally:
        cc.reset_cache()
        jax.config.update("jax_compilation_cache_dir", before)


def test_kill_and_resume_repeats_the_loss_curve_bit_identically(tmp_path, compilation_cache):
    def run(out, kill_after=None, resume=False):
        trainer, tok = lora_trainer(dropout=0.1)
        it = iter(sft_dataset(toy_sft_examples(tok), DataConfig(seq_len=24, batch_size=2, grad_accum=2, seed=5,
                                                                num_epochs=None)))
        it = KilledAfter(it, kill_after) if kill_after else it
        fit(trainer, it, LoopConfig(output_dir=str(out), save_every=2, resume=resume, progress=False, plot=False))

    run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill_after=5)  # checkpoints at steps 2 and 4; step 5 is lost
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    run(tmp_path / "killed", resume=True)
    whole = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if "loss" in r]
    resumed = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == whole  # exactly equal floats


def test_full_finetuning_from_scratch_learns_and_changes_every_param():
    from flax import nnx
    model, tok = tiny("tiny-gpt2", seed=3)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    trainer = Trainer(model, TrainConfig(method="full", max_steps=15, learning_rate=3e-3, compute_dtype="bfloat16",
                                         warmup_steps=2))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(trainer.params))  # f32 master weights
    it = iter(sft_dataset(toy_sft_examples(tok), DataConfig(seq_len=32, batch_size=4, num_epochs=None)))
    losses = [float(trainer.train_step(next(it))["loss"]) for _ in range(15)]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 1.0, losses
    after = nnx.state(trainer.model(), nnx.Param)
    changed = jax.tree.map(lambda x, y: not np.array_equal(x, np.asarray(y)), before, after)
    assert all(jax.tree.leaves(changed))


def test_schedules_and_validation():
    cosine = make_schedule(TrainConfig(max_steps=10, learning_rate=1.0, warmup_steps=2))
    assert [float(cosine(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(cosine(10)) == pytest.approx(0.0, abs=1e-6) and 0.4 < float(cosine(6)) < 0.6
    linear = make_schedule(TrainConfig(max_steps=4, learning_rate=1.0, lr_schedule="linear"))
    assert [float(linear(s)) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="method='sft'"):
        TrainConfig(method="sft")
    model, _ = tiny("tiny-llama")
    with pytest.raises(ValueError, match="has none"):
        Trainer(model, TrainConfig(method="lora"))


def _cli():
    spec = importlib.util.spec_from_file_location("finetune_lora_cli", ROOT / "scripts" / "finetune_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_adapter_and_merged_model(tmp_path):
    cli = _cli()
    out = tmp_path / "run"
    cli.main(["--model", "tiny-llama", "--steps", "3", "--seq-len", "64", "--batch-size", "2", "--r", "4",
              "--output", str(out), "--merge", "--no-progress", "--mesh-data", "1", "--dtype", "float32",
              "--remat-policy", "save_attention"])
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 32 and cfg["peft_type"] == "LORA"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "tokenizer.json").is_file()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]
    assert any("eval_loss" in r for r in read_metrics(out / "metrics.jsonl"))


def test_cli_takes_the_training_arguments_names(capsys):
    """transformers / TRL / PEFT names of the same settings, in either spelling, land on the same options; --help
    lists only ours."""
    cli = _cli()
    hf = cli.parse_args(["--model_name_or_path", "tiny-llama", "--learning_rate", "1e-3", "--num-train-epochs", "2",
                         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3", "--lora_r", "8",
                         "--lora-alpha", "16", "--lora_dropout", "0.1", "--max_seq_length", "128",
                         "--output_dir", "/tmp/x", "--lr_scheduler_type", "linear", "--logging_steps", "5",
                         "--max_steps", "7", "--warmup_steps", "2", "--use_rslora", "--eval_split", "0.1"])
    ours = cli.parse_args(["--model", "tiny-llama", "--lr", "1e-3", "--epochs", "2", "--batch-size", "4",
                           "--grad-accum", "3", "--r", "8", "--alpha", "16", "--dropout", "0.1", "--seq-len", "128",
                           "--output", "/tmp/x", "--lr-schedule", "linear", "--log-every", "5", "--steps", "7",
                           "--warmup-steps", "2", "--use-rslora", "--eval-split", "0.1"])
    assert vars(hf) == vars(ours) and ours.lr == 1e-3 and ours.batch_size == 4 and ours.use_rslora
    assert cli.parse_args(["--max_length", "99"]).seq_len == 99
    assert vars(cli.parse_args([])) == vars(cli.parse_args(["--seq-len", "512"]))  # the aliases keep the defaults
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--lr LR" in text and "--seq-len" in text and "learning_rate" not in text and "--seq_len" not in text


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_hidden_states_projection_equals_model_logits(preset):
    import ie_jax
    import jax.numpy as jnp
    from finetune.forward import hidden_states, output_projection
    from ft_helpers import random_ids
    model, _ = tiny(preset)
    ids = random_ids(9, (2, 10))
    h = hidden_states(model, ids, jnp.broadcast_to(jnp.arange(10), (2, 10)))
    got = output_projection(model)(h.reshape(20, -1)).reshape(2, 10, -1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ie_jax.forward(model, ids)), atol=2e-6, rtol=1e-5)


def test_remat_policies_give_the_same_step():
    """One step without remat, and the same step under each named policy (one reference run for all three)."""
    t1, tok = lora_trainer()
    batch = next(iter(sft_dataset(toy_sft_examples(tok), DataConfig(seq_len=24, batch_size=2))))
    loss = float(t1.train_step(batch)["loss"])
    for policy in ["save_projections", "save_attention", "save_all"]:
        t2, _ = lora_trainer(remat_policy=policy)
        assert float(t2.train_step(batch)["loss"]) == pytest.approx(loss, rel=1e-6), policy
        for a, b in zip(jax.tree.leaves(t1.params), jax.tree.leaves(t2.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=policy)


def _dot_widths(policy):
    """Output widths of every matmul in one gradient of the layers' hidden states under `policy`."""
    import collections
    import jax.numpy as jnp
    from finetune.forward import hidden_states
    from finetune.lora import LoRAParam
    from flax import nnx
    model, _ = tiny("tiny-llama")
    apply_lora(model, LoraConfig(r=4, alpha=8, init_lora_weights=False))
    model.remat = True
    graphdef, params, rest = nnx.split(model, LoRAParam, ...)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 8)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))

    def loss(params):
        return jnp.sum(hidden_states(nnx.merge(graphdef, params, rest), ids, pos, remat_policy=policy) ** 2)

    widths = collections.Counter()

    def walk(jpr):
        for eqn in jpr.eqns:
            if eqn.primitive.name == "dot_general":
                widths[eqn.outvars[0].aval.shape[-1]] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    return widths


def test_named_policies_recompute_only_what_they_drop():
    from ie_jax.presets import get_preset
    cfg = get_preset("tiny-llama")
    F, r = cfg.intermediate_size, 4
    q, kv, D = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
    least = _dot_widths("save_all")  # keeps every GEMM output the backward pass needs
    extra = lambda policy: sorted((_dot_widths(policy) - least).elements())  # noqa: E731
    # Nothing saved: every projection (base and adapter x @ A, @ B) runs twice.
    assert {q, kv, D, F, r} <= set(extra("nothing"))
    # save_attention: only the gate/up GEMMs run again, each as base + adapter @ B (x @ A is kept).
    assert extra("save_attention") == [F] * 4
    assert extra("save_all") == [] and not (least - _dot_widths("nothing"))


def test_frozen_head_nll_matches_chunked_nll_and_its_gradient():
    import jax.numpy as jnp
    from finetune.losses import chunked_token_nll, frozen_head_nll
    k = jax.random.split(jax.random.key(3), 4)
    h = jax.random.normal(k[0], (2, 13, 32), jnp.float32)  # 26 tokens: chunks of 8 with padding
    w = 0.3 * jax.random.normal(k[1], (32, 50), jnp.float32)
    t = jax.random.randint(k[2], (2, 13), 0, 50)
    ct = jax.random.uniform(k[3], (2, 13))  # uneven per-token weights, as DPO's summed log-probs give
    expected = lambda h: jnp.sum(chunked_token_nll(h, lambda x: x @ w, t, chunk=8) * ct)  # noqa: E731
    got = lambda h: jnp.sum(frozen_head_nll(h, w, t, chunk=8) * ct)  # noqa: E731
    np.testing.assert_allclose(float(got(h)), float(expected(h)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(got))(h)), np.asarray(jax.grad(expected)(h)), atol=1e-6)


@pytest.mark.parametrize("policy,forward_kernels", [("nothing", 2), ("save_attention", 1), ("save_all", 1)])
def test_named_policies_keep_the_flash_residuals(policy, forward_kernels):
    """Under a named policy the flash kernel's own residuals (output, lse) are kept, so the gradient runs its
    forward kernel once; with nothing saved the backward pass reruns it. Traced with the Pallas kernels (no run)."""
    import collections
    import dataclasses
    import jax.numpy as jnp
    from finetune.forward import hidden_states
    from finetune.lora import LoRAParam
    from flax import nnx
    from ie_jax.presets import get_preset
    from ie_jax.weights import init_model
    from kernels_pallas import ops
    cfg = dataclasses.replace(get_preset("tiny-llama"), hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64,
                              intermediate_size=256)
    model = init_model(cfg, dtype=jnp.bfloat16, seed=0)
    apply_lora(model, LoraConfig(r=4, alpha=8, init_lora_weights=False))
    model.remat = True
    graphdef, params, rest = nnx.split(model, LoRAParam, ...)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 200, (1, 128)), jnp.int32)
    pos = jnp.arange(128)[None]

    def loss(params):
        h = hidden_states(nnx.merge(graphdef, params, rest), ids, pos, remat_policy=policy)
        return jnp.sum(h.astype(jnp.float32) ** 2)

    # kernel calls: "forward" is the one returning the f32 lse [B, N, T] (T = 128 is padded to 256 inside)
    kernels = collections.Counter()

    def walk(jpr):
        for eqn in jpr.eqns:
            if eqn.primitive.name in ("pallas_call", "custom_vmap_call", "mpmd_map", "core_map"):
                avals = [v.aval for v in eqn.outvars]
                lse = any(a.dtype == jnp.float32 and a.shape == (1, cfg.num_heads, 256) for a in avals)
                kernels["forward" if lse else "backward"] += 1
                continue
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    with ops.kernel_backend("pallas"):
        walk(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert kernels["backward"] == 2  # dK/dV and dQ
    assert kernels["forward"] == forward_kernels
