"""Residual add + RMSNorm over split-K partials (kernels_pallas/add_norm.py): the kernel in the Pallas interpreter
against the jnp reference, the explicit split-K product, the model's decode path that uses both against its plain
path, and `gpu` checks at Llama-3-8B sizes. Random normal inputs throughout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from ie_jax.config import ModelConfig
from ie_jax.models.context import Paged
from engine.runner import unstack_layers
from ie_jax.models.llama import LlamaForCausalLM, fuse_projections
from kernels_pallas import add_norm, ops


def inputs(M, D, S, dtype, seed=0):
    kx, kp, kw = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kx, (M, D), dtype), 0.5 * jax.random.normal(kp, (S, M, D), jnp.float32),
            (1 + 0.1 * jax.random.normal(kw, (D,), jnp.float32)).astype(dtype))


@pytest.mark.parametrize("M,S,dtype", [(1, 8, jnp.bfloat16), (8, 4, jnp.bfloat16), (3, 8, jnp.float32)])
def test_kernel_matches_the_reference(M, S, dtype):
    x, partials, w = inputs(M, 256, S, dtype)
    got = add_norm.add_rmsnorm(x, partials, w, eps=1e-5, interpret=True)
    want = add_norm.add_rmsnorm_reference(x, partials, w, 1e-5)
    for g, r in zip(got, want):
        assert g.dtype == x.dtype and g.shape == x.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=1e-6, atol=1e-6)
    # the reference is the model's arithmetic: x + sum of partials, rounded, then RMSNorm
    x_new = (x.astype(jnp.float32) + partials.sum(0)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(want[0], np.float32), np.asarray(x_new, np.float32))


def test_extra_term_is_added_with_the_partials():
    """`extra` (a LoRA update of the same projection) is one more f32 term: kernel == reference == the sum with it
    as a partial."""
    x, partials, w = inputs(5, 256, 4, jnp.bfloat16, seed=3)
    extra = 0.5 * jax.random.normal(jax.random.key(9), x.shape, jnp.float32)
    got = add_norm.add_rmsnorm(x, partials, w, extra, eps=1e-5, interpret=True)
    want = add_norm.add_rmsnorm_reference(x, partials, w, 1e-5, extra)
    as_partial = add_norm.add_rmsnorm_reference(x, jnp.concatenate([partials, extra[None]]), w, 1e-5)
    without = add_norm.add_rmsnorm_reference(x, partials, w, 1e-5)
    for g, r, c, n in zip(got, want, as_partial, without):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(r, np.float32), np.asarray(c, np.float32), rtol=1e-2, atol=1e-2)
        assert not np.allclose(np.asarray(r, np.float32), np.asarray(n, np.float32), atol=1e-2)
    with pytest.raises(ValueError, match="extra.shape"):
        add_norm.add_rmsnorm(x, partials, w, extra[:3], eps=1e-5, interpret=True)


def test_split_k_partials_sum_to_the_product():
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (5, 1024), jnp.float32)
    w = jax.random.normal(kw, (1024, 96), jnp.float32)
    p = add_norm.split_k_partials(x, w, 8)
    assert p.shape == (8, 5, 96) and p.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(p.sum(0)), np.asarray(x @ w), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="multiple"):
        add_norm.split_k_partials(x, w, 3)


def test_num_splits_cuts_k_into_slabs_of_128():
    assert add_norm.num_splits(4096, 8) == 8 and add_norm.num_splits(14336, 8) == 8
    assert add_norm.num_splits(4096, 16) == 16 and add_norm.num_splits(4096, 4) == 4
    assert add_norm.num_splits(256, 8) == 2 and add_norm.num_splits(384, 8) == 0 and add_norm.num_splits(4096, 1) == 0


def test_supported_shapes():
    assert add_norm.supported(4096, 8) and add_norm.supported(128, 1)
    assert not add_norm.supported(3584, 8)  # not a power of two: the model keeps its plain path
    assert not add_norm.supported(4096, 0) and not add_norm.supported(4096, 17) and not add_norm.supported(64, 4)


def test_bad_arguments_are_named():
    x, partials, w = inputs(4, 256, 4, jnp.bfloat16)
    with pytest.raises(ValueError, match="do not match"):
        add_norm.add_rmsnorm(x, partials[:, :3], w, eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="float32"):
        add_norm.add_rmsnorm(x, partials.astype(jnp.bfloat16), w, eps=1e-5, interpret=True)


@struct.dataclass
class DenseServing(Paged):
    """A serving context whose attention is dense causal over the step's own tokens (no cache to build)."""

    def attend(self, q, k, v, positions, caches, layer, *, scale, sliding_window=None):
        return ops.attention_reference(q, k, v, scale=scale, sliding_window=sliding_window), caches


def test_decode_layers_take_the_fused_add_norm_and_match_the_plain_path(monkeypatch):
    """Serving steps of <= ADD_NORM_MAX_TOKENS tokens, with the kernels on: the o and down projections become split-K
    partials and every residual add is folded into the norm after it; the logits equal the plain path's, through
    the layer loop and the unrolled layers. Larger steps keep the plain path."""
    cfg = ModelConfig(model_type="llama", vocab_size=263, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=64, intermediate_size=512, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    fuse_projections(model)
    calls = []
    real = ops.add_rmsnorm
    monkeypatch.setattr(ops, "add_rmsnorm", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))

    layer_states = unstack_layers(model, release=False)

    def logits(T, fused, unrolled=False):
        monkeypatch.setenv("IE_JAX_FUSED_ADD_NORM", "1" if fused else "0")
        ids = jax.random.randint(jax.random.key(T), (1, T), 0, cfg.vocab_size)
        i32 = jnp.zeros((1,), jnp.int32)
        ctx = DenseServing(jnp.zeros((1,)), None, i32, i32[None], i32, i32, i32[0])
        with ops.kernel_backend("interpret"):
            return model(ids, jnp.arange(T)[None], ctx, layer_states=layer_states if unrolled else None)[0]

    plain, fused = logits(8, False), logits(8, True)
    np.testing.assert_allclose(np.asarray(logits(8, True, unrolled=True)), np.asarray(plain), rtol=2e-5, atol=2e-5)
    # K = 512 -> 4 splits; the scanned layer body (two add + norms) is traced once, then the final norm
    assert len(calls) >= 3 and set(calls) == {(4, 8, 256)}
    np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), rtol=2e-5, atol=2e-5)
    calls.clear()
    logits(32, True)
    assert calls == []  # past ADD_NORM_MAX_TOKENS: the plain path


def test_lora_adapted_decode_layers_keep_the_fused_add_norm(monkeypatch):
    """With serving LoRA slots on every projection (engine/lora.py) the o and down projections' adapter updates
    ride the add + norm kernel as its `extra` term: the logits equal the plain path's (base GEMM + update, then
    separate adds and norms), for tokens of two adapters and of the base model, scanned and unrolled."""
    from engine.lora import LoRASlots, add_adapter_slots
    cfg = ModelConfig(model_type="llama", vocab_size=263, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=64, intermediate_size=512, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    fuse_projections(model)
    add_adapter_slots(model, max_loras=2, max_rank=4)
    keys = iter(jax.random.split(jax.random.key(5), 64))
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRASlots):
            m.lora_a[...] = 0.1 * jax.random.normal(next(keys), m.lora_a.shape, jnp.float32)
            m.lora_b[...] = 0.1 * jax.random.normal(next(keys), m.lora_b.shape, jnp.float32)
    extras = []
    real = ops.add_rmsnorm
    monkeypatch.setattr(ops, "add_rmsnorm", lambda *a, **k: extras.append(a[3] is not None) or real(*a, **k))
    layer_states = unstack_layers(model, release=False)
    T = 8
    ids = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
    slots = jnp.asarray([-1, -1, 0, 1, 0, 1, -1, 1], jnp.int32)  # the first two: base model

    def logits(fused, slots=slots, unrolled=False):
        monkeypatch.setenv("IE_JAX_FUSED_ADD_NORM", "1" if fused else "0")
        i32 = jnp.zeros((1,), jnp.int32)
        ctx = DenseServing(jnp.zeros((1,)), None, i32, i32[None], i32, i32, i32[0], lora_slots=slots)
        with ops.kernel_backend("interpret"):
            return model(ids, jnp.arange(T)[None], ctx, layer_states=layer_states if unrolled else None)[0]

    plain = logits(False)
    assert extras == []
    fused = logits(True)
    assert extras and all(extras)  # every add + norm, the final one included, took the adapters' update
    np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(logits(True, unrolled=True)), np.asarray(plain), rtol=2e-5, atol=2e-5)
    base = logits(True, slots=jnp.full((T,), -1, jnp.int32))
    assert not np.allclose(np.asarray(base), np.asarray(plain), atol=1e-3)  # the adapters change the logits
    # causal: tokens before the first adapted one see no adapter either way
    np.testing.assert_allclose(np.asarray(base[:, :2]), np.asarray(plain[:, :2]), rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 16])
def test_gpu_kernel_at_llama_3_8b_sizes(M):
    x, partials, w = inputs(M, 4096, 8, jnp.bfloat16, seed=M)
    extra = 0.5 * jax.random.normal(jax.random.key(M), x.shape, jnp.float32) if M == 8 else None  # a LoRA update
    got = add_norm.add_rmsnorm(x, partials, w, extra, eps=1e-5)
    want = add_norm.add_rmsnorm_reference(x, partials, w, 1e-5, extra)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=1e-2, atol=1e-2)
