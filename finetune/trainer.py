"""The training step and its optimizer: SFT (LoRA, QLoRA, full, from scratch) and DPO, on one device or a mesh.

    trainer = Trainer(model, TrainConfig(method="lora", max_steps=100), mesh=make_mesh(model=1, data=8))
    metrics = trainer.train_step(batch)          # batch: data.py's dict of [A, B, T] arrays
    eval_metrics = trainer.evaluate(batches)

The model is split once into (trainable params, everything else). Trainable = the `LoRAParam`s for lora / qlora /
dpo, every `nnx.Param` for full. Trainable params are kept in f32 (the master copy) and the optimizer only ever
sees them; the forward pass casts them to `compute_dtype`. One jitted step scans over the A micro-batches of a
batch (gradient accumulation), sums token losses and gradients, divides by the batch's total loss weight (so
accumulation equals one large batch), clips, and applies optax AdamW with warmup + cosine/linear decay. Dropout keys
are derived from (seed, step), so a resumed run repeats the same randomness.

DPO's reference model is the same network with the adapters zeroed (delta = 0 exactly), evaluated under
stop_gradient inside the step; no second copy of the weights exists. With `precompute_ref_log_probs` the batches
carry the reference log-probs instead (see `reference_logps`).

This module knows nothing of files, progress bars or checkpoints (see loop.py, checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from finetune.forward import REMAT_POLICIES, frozen_head_kernel, hidden_states, output_projection
from finetune.lora import LoRAParam, lora_modules, reseed_dropout, set_dropout
from finetune.losses import DPOConfig, chunked_token_nll, dpo_loss, frozen_head_nll, sequence_logps
from ie_jax.sharding import state_shardings

METHODS = ("lora", "qlora", "dpo", "full")
SCHEDULES = ("cosine", "linear", "constant")
COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str = "lora"
    max_steps: int = 100
    learning_rate: float = 2e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None: no clipping
    compute_dtype: str = "bfloat16"
    gradient_checkpointing: bool = True  # jax.checkpoint per decoder layer
    remat_policy: str = "nothing"  # with checkpointing: what each layer keeps (forward.REMAT_POLICIES)
    loss_chunk: int = 2048  # tokens per chunk of the output projection + cross-entropy
    seed: int = 0
    dpo: DPOConfig = DPOConfig()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {METHODS}")
        if self.max_steps <= 0:
            raise ValueError(f"max_steps={self.max_steps} must be positive")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {SCHEDULES}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps}]")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0 or None")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} must be one of {sorted(COMPUTE_DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} must be one of {REMAT_POLICIES}")
        if self.loss_chunk <= 0:
            raise ValueError(f"loss_chunk={self.loss_chunk} must be positive")


def make_schedule(config: TrainConfig) -> optax.Schedule:
    peak, end = config.learning_rate, config.learning_rate * config.min_lr_ratio
    decay_steps = max(config.max_steps - config.warmup_steps, 1)
    if config.lr_schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.lr_schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if not config.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(make_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                        weight_decay=config.weight_decay)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


def _batch_sharding(mesh):
    # [A, B, T] arrays (and [A, B]): rows split over "data"; the accumulation axis is scanned, never split.
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(None, "data"))


class Trainer:
    def __init__(self, model: nnx.Module, config: TrainConfig, *, mesh=None, rules="fsdp"):
        self.config, self.mesh = config, mesh
        is_lora = config.method != "full"
        if is_lora and not lora_modules(model):
            raise ValueError(f"method={config.method!r} trains adapters, but the model has none (call apply_lora)")
        model.remat = config.gradient_checkpointing
        self.trainable = LoRAParam if is_lora else nnx.Param
        graphdef, params, rest = nnx.split(model, self.trainable, ...)
        rates = [m.dropout for _, m in lora_modules(model)]
        set_dropout(model, 0.0)
        self.eval_graphdef = nnx.split(model, self.trainable, ...)[0]
        for (_, m), rate in zip(lora_modules(model), rates):
            m.dropout = rate
        self.graphdef = graphdef
        self._param_dtypes = jax.tree.map(lambda x: x.dtype, params)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # f32 master copy
        if mesh is not None:
            params = jax.device_put(params, state_shardings(params, mesh, rules))
            rest = jax.device_put(rest, state_shardings(rest, mesh, rules))
        self.params, self.rest = params, rest
        self.optimizer = make_optimizer(config)
        self.opt_state = jax.jit(self.optimizer.init)(params)
        if mesh is None:  # committed to the device, as the step's outputs are, or the second step compiles again
            self.params, self.rest, self.opt_state = jax.device_put((params, rest, self.opt_state), jax.devices()[0])
        self.schedule = make_schedule(config)
        self.step = 0
        self._train = jax.jit(self._train_step, donate_argnums=(0, 1))  # params and optimizer state update in place
        self._eval = jax.jit(self._eval_step)
        self._ref = jax.jit(self._reference_logps)

    # ------------------------------------------------------------------------------------------------------------
    # Forward passes

    def _model(self, graphdef, params, rest):
        dtype = COMPUTE_DTYPES[self.config.compute_dtype]
        if self.config.method == "full":
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        return nnx.merge(graphdef, params, rest)

    def _nll(self, model, mb, prefix=""):
        g = lambda k: mb[prefix + k]  # noqa: E731
        policy = self.config.remat_policy if self.config.gradient_checkpointing else "nothing"
        h = hidden_states(model, g("inputs"), g("positions"), g("segment_ids"), remat_policy=policy)  # [B, T, D]
        kernel = frozen_head_kernel(model) if self.config.method != "full" else None
        if kernel is not None:  # adapters train no head: its gradient GEMM is formed in the forward pass
            return frozen_head_nll(h, kernel, g("targets"), chunk=self.config.loss_chunk)
        return chunked_token_nll(h, output_projection(model), g("targets"), chunk=self.config.loss_chunk)

    def _pair_logps(self, model, mb):
        """Summed completion log-probs of the chosen and rejected rows, [B] each, in one forward over [2B, T]."""
        both = {k: jnp.concatenate([mb["chosen_" + k], mb["rejected_" + k]]) for k in
                ("inputs", "targets", "weights", "segment_ids", "positions")}
        logps = sequence_logps(self._nll(model, both), both["weights"])
        return jnp.split(logps, 2)

    def _loss(self, params, rest, mb, graphdef):
        """Summed loss over the micro-batch (the caller normalizes) and summed metrics."""
        model = self._model(graphdef, params, rest)
        if self.config.method != "dpo":
            nll = self._nll(model, mb)
            return jnp.sum(nll * mb["weights"]), {}
        chosen, rejected = self._pair_logps(model, mb)
        if "ref_chosen_logps" in mb:
            ref_chosen, ref_rejected = mb["ref_chosen_logps"], mb["ref_rejected_logps"]
        else:  # the adapter-disabled base: every LoRA factor zero gives a zero update, exactly
            zeros = jax.tree.map(jnp.zeros_like, params)
            ref_chosen, ref_rejected = jax.lax.stop_gradient(self._pair_logps(self._model(graphdef, zeros, rest), mb))
        losses, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.config.dpo,
                                   mb["chosen_weights"].sum(-1), mb["rejected_weights"].sum(-1))
        valid = mb["valid"]
        return jnp.sum(losses * valid), {k: jnp.sum(v * valid) for k, v in metrics.items()}

    @staticmethod
    def _normalizer(batch):
        return jnp.maximum(jnp.sum(batch["valid"] if "valid" in batch else batch["weights"]), 1.0)

    # ------------------------------------------------------------------------------------------------------------
    # Jitted steps

    def _train_step(self, params, opt_state, rest, batch, step):
        rest = reseed_dropout(rest, jax.random.fold_in(jax.random.key(self.config.seed), step))
        grad_fn = jax.value_and_grad(functools.partial(self._loss, graphdef=self.graphdef), has_aux=True)

        def micro(carry, mb):  # one micro-batch [B, T]: add its summed loss and gradient
            grads, loss, metrics = carry
            (l, m), g = grad_fn(params, rest, mb)
            return (jax.tree.map(jnp.add, grads, g), loss + l, jax.tree.map(jnp.add, metrics, m)), None

        zero_metrics = jax.eval_shape(lambda: self._loss(params, rest, jax.tree.map(lambda x: x[0], batch),
                                                         self.graphdef)[1])
        init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics))
        (grads, loss, metrics), _ = jax.lax.scan(micro, init, batch)
        n = self._normalizer(batch)
        with jax.named_scope("optimizer"):
            grads = jax.tree.map(lambda g: g / n, grads)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        out = {"loss": loss / n, "grad_norm": optax.global_norm(grads), "learning_rate": self.schedule(step),
               "num_tokens": jnp.sum(batch["segment_ids" if "segment_ids" in batch else "chosen_segment_ids"] > 0)}
        out.update({k: v / n for k, v in metrics.items()})
        return params, opt_state, out

    def _eval_step(self, params, rest, batch):
        def micro(carry, mb):
            loss, metrics = self._loss(params, rest, mb, self.eval_graphdef)
            return jax.tree.map(jnp.add, carry, (loss, metrics)), None

        zero = jax.eval_shape(lambda: self._loss(params, rest, jax.tree.map(lambda x: x[0], batch),
                                                 self.eval_graphdef))
        (loss, metrics), _ = jax.lax.scan(micro, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero), batch)
        return loss, metrics, self._normalizer(batch)

    def _reference_logps(self, params, rest, batch):
        zeros = jax.tree.map(jnp.zeros_like, params)
        model = self._model(self.eval_graphdef, zeros, rest)
        return jax.lax.map(lambda mb: self._pair_logps(model, mb), batch)  # ([A, B], [A, B])

    # ------------------------------------------------------------------------------------------------------------
    # Host API

    def _put(self, batch: dict):
        batch = {k: np.asarray(v) for k, v in batch.items()}
        sharding = _batch_sharding(self.mesh)
        return jax.device_put(batch, sharding) if sharding is not None else jax.device_put(batch)

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a batch of [A, B, T] arrays; returns device scalars (read them lazily)."""
        self.params, self.opt_state, metrics = self._train(self.params, self.opt_state, self.rest, self._put(batch),
                                                           jnp.asarray(self.step, jnp.int32))
        self.step += 1
        return metrics

    def evaluate(self, batches) -> dict:
        """Mean loss (and DPO metrics) over an iterable of batches, with dropout off."""
        total, weight, sums = 0.0, 0.0, {}
        for batch in batches:
            loss, metrics, n = jax.device_get(self._eval(self.params, self.rest, self._put(batch)))
            total, weight = total + float(loss), weight + float(n)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if weight == 0:
            raise ValueError("evaluate() got no batches")
        return {"eval_loss": total / weight, **{f"eval_{k}": v / weight for k, v in sums.items()}}

    def reference_logps(self, batch: dict):
        """Reference (adapter-off) summed log-probs of a preference batch: (chosen [A, B], rejected [A, B])."""
        return jax.device_get(self._ref(self.params, self.rest, self._put(batch)))

    def model(self) -> nnx.Module:
        """The trained model (full fine-tuning: params cast back to their original dtypes)."""
        params = self.params
        if self.config.method == "full":
            params = jax.tree.map(lambda x, d: x.astype(d), params, self._param_dtypes)
        return nnx.merge(self.graphdef, params, self.rest)
