"""Training losses as pure functions of logits / log-probs: token cross-entropy for SFT and the DPO family.

  token_nll          -log p(target) per token, from f32 logits [B, T, V]
  chunked_token_nll  the same from hidden states [B, T, D] and an output projection, computed over token chunks
                     under jax.checkpoint so the [B, T, V] logits are never all alive (the large-vocabulary case)
  frozen_head_nll    the same for a frozen output matrix [D, V]: each chunk's gradient with respect to its hidden
                     states is formed in the forward pass, so the backward pass runs no vocabulary GEMM again
  dpo_loss           DPO (Rafailov et al., 2023, Eq. 7) on summed completion log-probs, with the variants TRL
                     names by `loss_type`: sigmoid (+ label smoothing, cDPO), ipo, hinge, robust

This module knows nothing of models, adapters or batching.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def token_nll(logits, targets):
    """logits [B, T, V] f32, targets [B, T] int32 -> [B, T] f32 negative log-likelihood."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def chunked_token_nll(hidden, project, targets, *, chunk: int = 1024):
    """hidden [B, T, D], project: [N, D] -> [N, V] f32 logits, targets [B, T] -> nll [B, T] f32.

    Tokens are flattened and processed `chunk` at a time under jax.checkpoint: each chunk's logits are recomputed in
    the backward pass rather than stored, so memory holds one [chunk, V] block instead of [B*T, V].
    """
    h, t = _chunks(hidden, targets, chunk)

    @jax.checkpoint
    def one(args):
        hc, tc = args
        return token_nll(project(hc)[None], tc[None])[0]

    with jax.named_scope("cross_entropy"):
        nll = jax.lax.map(one, (h, t))  # [C, chunk]
    return _unchunk(nll, hidden.shape[:2])


def _chunks(hidden, targets, chunk):
    """hidden [B, T, D], targets [B, T] -> the flat tokens padded to whole chunks: [C, chunk, D], [C, chunk]."""
    B, T, D = hidden.shape
    n = B * T
    chunk = min(chunk, n)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, D), ((0, pad), (0, 0))).reshape(-1, chunk, D)  # [C, chunk, D]
    t = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)  # [C, chunk]
    return h, t


def _unchunk(x, batch_shape):
    """[C, chunk, ...] -> [B, T, ...]: drop the padding tokens `_chunks` added."""
    B, T = batch_shape
    return x.reshape(-1, *x.shape[2:])[:B * T].reshape(B, T, *x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _frozen_head_nll(hidden, kernel, targets, chunk):
    return _frozen_head(hidden, kernel, targets, chunk, with_grad=False)[0]


def _frozen_head(hidden, kernel, targets, chunk, with_grad=True):
    h, t = _chunks(hidden, targets, chunk)
    w = kernel.astype(hidden.dtype)  # [D, V]

    def one(args):  # d nll / d logits = softmax - onehot, so d nll / d h = (softmax - onehot) @ W^T
        hc, tc = args
        logits = jnp.dot(hc, w, preferred_element_type=jnp.float32)  # [chunk, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        if not with_grad:
            return nll, None
        dlogits = jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
        dh = jnp.dot(dlogits.astype(hc.dtype), w.T, preferred_element_type=jnp.float32)  # [chunk, D]
        return nll, dh.astype(hc.dtype)

    with jax.named_scope("cross_entropy"):
        nll, dh = jax.lax.map(one, (h, t))  # [C, chunk], [C, chunk, D]
    batch_shape = hidden.shape[:2]
    return _unchunk(nll, batch_shape), None if dh is None else _unchunk(dh, batch_shape)


def _frozen_head_bwd(chunk, dh, ct):  # ct [B, T]: the cotangent of each token's nll
    return (dh * ct[..., None].astype(dh.dtype)).astype(dh.dtype), None, None


_frozen_head_nll.defvjp(_frozen_head, _frozen_head_bwd)


def frozen_head_nll(hidden, kernel, targets, *, chunk: int = 1024):
    """hidden [B, T, D], kernel [D, V] (frozen: no gradient flows to it), targets [B, T] -> nll [B, T] f32.

    `chunked_token_nll` with logits = hidden @ kernel. Its backward pass would run each chunk's vocabulary GEMM
    twice more (recomputed logits, then the gradient); here the forward pass keeps d nll / d hidden (bf16, the size
    of `hidden`) and the backward pass only scales it by each token's cotangent: one GEMM fewer per chunk."""
    return _frozen_head_nll(hidden, jax.lax.stop_gradient(kernel), targets, chunk)


def sequence_logps(nll, weights):
    """Summed log-prob of the weighted (completion) tokens per row: nll [B, T], weights [B, T] -> [B]."""
    return -jnp.sum(nll * weights, axis=-1)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # the probability that a preference label is flipped (cDPO / robust DPO)
    precompute_ref_log_probs: bool = False  # one pass over the data before training instead of one per step

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} must be one of {LOSS_TYPES}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing={self.label_smoothing} applies to loss_type 'sigmoid' or 'robust', "
                             f"not {self.loss_type!r}")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config: DPOConfig,
             chosen_lengths=None, rejected_lengths=None):
    """Per-pair DPO losses and rewards from summed completion log-probs, each [B].

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))     (Eq. 7's argument / beta)
      sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      robust   (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
      hinge    max(0, 1 - beta h)
      ipo      (h - 1 / (2 beta))^2, with log-probs averaged over completion tokens as IPO defines them (the
               lengths are required)
    Returns (losses [B], metrics dict of [B] arrays: rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected).
    """
    beta, eps = config.beta, config.label_smoothing
    pc, pr, rc, rr = policy_chosen, policy_rejected, ref_chosen, ref_rejected
    if config.loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs the completion lengths")
        lc, lr = jnp.maximum(chosen_lengths, 1), jnp.maximum(rejected_lengths, 1)
        h = (pc - rc) / lc - (pr - rr) / lr
    else:
        h = (pc - rc) - (pr - rr)
    if config.loss_type == "sigmoid":
        losses = -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif config.loss_type == "robust":
        losses = (-(1 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * eps)
    elif config.loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    else:
        losses = jnp.square(h - 1 / (2 * beta))
    chosen_rewards = beta * jax.lax.stop_gradient(pc - rc)
    rejected_rewards = beta * jax.lax.stop_gradient(pr - rr)
    metrics = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
               "rewards/margins": chosen_rewards - rejected_rewards,
               "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
               "logps/chosen": jax.lax.stop_gradient(pc), "logps/rejected": jax.lax.stop_gradient(pr)}
    return losses, metrics
