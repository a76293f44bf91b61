"""The model's forward pass split at the last hidden state, so the loss can apply the output projection in chunks
(losses.chunked_token_nll) instead of materializing [B, T, V] logits.

`hidden_states` repeats the few top-level lines of each family's `__call__` (embed → scanned layers → final norm)
through the model's own submodules and `scan_layers`; `output_projection` is the matching head. A test checks that
projecting the hidden states gives the model's own logits, so this file cannot drift from the model silently.
It knows nothing of losses or adapters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ie_jax.models.context import DenseCausal
from ie_jax.models.llama import scan_layers

REMAT_POLICIES = ("nothing", "save_projections", "save_attention", "save_all")

# Values the model and the adapters tag with `checkpoint_name` (ie_jax/models/llama.py, lora.py). Per token and
# layer, for Llama-3-8B in bf16: q, k, v after rotary 12 KiB, attention output 8 KiB, the residual after attention
# 8 KiB, the MLP gate and up outputs 28 KiB each, the adapters' x @ A 0.2 KiB.
ATTENTION_NAMES = ("attn_q", "attn_k", "attn_v", "flash_out", "flash_lse", "resid_mid", "lora_down")
MLP_NAMES = ("mlp_gate", "mlp_up")


def save_projections_policy(prim, *avals, **params) -> bool:
    """A jax.checkpoint policy: keep the outputs of un-batched matmuls whose output width is at most their input
    width and that contract over more than 64 features: q/k/v/o and down projections (and LoRA's tiny x @ A), but
    not the wide MLP gate/up outputs [B, T, F] nor LoRA's @ B. The backward pass then recomputes the MLP's wide half,
    norms and attention, and the saved tensors cost about 5 x [B, T, D] per layer."""
    if prim is not jax.lax.dot_general_p:
        return False
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    if lhs_batch or rhs_batch:
        return False
    rhs = avals[1]
    contract = 1
    for d in rhs_contract:
        contract *= rhs.shape[d]
    free = 1
    for d in range(rhs.ndim):
        if d not in rhs_contract:
            free *= rhs.shape[d]
    return contract > 64 and free <= contract


def names_policy(names: tuple[str, ...]):
    """Save the tagged values in `names` (the flash kernel tags its own residuals, `flash_out` / `flash_lse`);
    recompute the rest (norms, rotary, elementwise, and the projections whose outputs are not named)."""
    return jax.checkpoint_policies.save_only_these_names(*names)


NAMED_POLICIES = {"save_attention": ATTENTION_NAMES, "save_all": ATTENTION_NAMES + MLP_NAMES}


def _scan_with_policy(layers, x, positions, ctx, policy):
    """scan_layers for the dense (cache-free) context, with a chosen jax.checkpoint policy per layer."""
    graphdef, state = nnx.split(layers)
    num_layers = jax.tree.leaves(state)[0].shape[0]

    def body(x, xs):
        layer_state, layer = xs
        x, _ = nnx.merge(graphdef, layer_state)(x, positions, ctx, None, layer)
        return x, None

    x, _ = jax.lax.scan(jax.checkpoint(body, policy=policy), x, (state, jnp.arange(num_layers)))
    return x


def _layers(model, x, positions, ctx, remat_policy):
    layers = model.h if model.config.is_gpt2 else model.layers
    if remat_policy == "save_projections":
        return _scan_with_policy(layers, x, positions, ctx, save_projections_policy)
    if remat_policy in NAMED_POLICIES:
        return _scan_with_policy(layers, x, positions, ctx, names_policy(NAMED_POLICIES[remat_policy]))
    return scan_layers(layers, x, positions, ctx, remat=model.remat)[0]


def hidden_states(model, token_ids, positions, segment_ids=None, remat_policy: str = "nothing"):
    """token_ids, positions, segment_ids [B, T] -> final normed hidden states [B, T, D] (activation dtype).

    remat_policy "nothing" runs the model's own scan (checkpointing per `model.remat`); "save_projections"
    checkpoints every layer with `save_projections_policy`; "save_attention" keeps the attention block's tagged
    values (q, k, v, its output, the residual after it) and recomputes the MLP's gate/up GEMMs in the backward pass
    (~36 KiB per token and layer on Llama-3-8B); "save_all" keeps the gate/up outputs too, so no GEMM runs twice
    (~92 KiB: for micro-batches of one 2048-token row)."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"{remat_policy=} must be one of {REMAT_POLICIES}")
    ctx = DenseCausal(segment_ids=segment_ids)
    cfg = model.config
    if cfg.is_gpt2:
        x = model.wte(token_ids) + model.wpe(jnp.clip(positions, 0, cfg.max_position_embeddings - 1))
        return model.ln_f(_layers(model, x, positions, ctx, remat_policy))
    x = model.embed_tokens(token_ids)  # [B, T, D]
    return model.norm(_layers(model, x, positions, ctx, remat_policy))


def output_projection(model):
    """A function hidden [N, D] -> logits [N, V] f32 (the tied embedding or lm_head, with any adapter on it)."""
    cfg = model.config
    if cfg.is_gpt2:
        return model.wte.attend
    if cfg.tie_word_embeddings:
        return model.embed_tokens.attend
    return lambda h: model.lm_head(h, out_dtype=jnp.float32)


def frozen_head_kernel(model):
    """The output matrix [D, V] when the head is a plain matrix (the tied embedding, or an lm_head without bias or
    adapter), else None. Adapter methods train no head, so their loss can use `losses.frozen_head_nll`."""
    from ie_jax.models.layers import Linear
    cfg = model.config
    if cfg.is_gpt2:
        return model.wte.embedding[...].T
    if cfg.tie_word_embeddings:
        return model.embed_tokens.embedding[...].T
    head = model.lm_head
    if type(head) is Linear and head.bias is None:
        return head.kernel[...]
    return None
