"""L2 prefetch of the next GEMM's weight during attention (kernels_pallas/l2_prefetch.py): the tile split (every
tile once, whatever the grid), the shapes it takes, the CUDA lowering on CPU (a kernel of its own, and inside the
decode tiles), that the interpreter's decode tiles give the same output with a prefetch operand, the model's
batch-1 decode layers handing the o projection's weight to attention (or to the prefetch kernel) without
changing the logits, and `gpu` runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from ie_jax.config import ModelConfig
from ie_jax.models.context import Paged
from ie_jax.models.llama import LlamaForCausalLM, fuse_projections
from kernels_pallas import l2_prefetch, ops
from kernels_pallas import paged_attention as pa
from tests.kernels.test_paged_attention import assert_close, make_batch

S = jax.ShapeDtypeStruct
H200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")


def abstract_h200():
    return use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=H200))


@pytest.mark.parametrize("shape,num_ctas", [((4096, 4096), 16), ((4096, 4096), 132), ((512, 384), 7),
                                            ((256, 128), 5), ((1024, 4096), 1)])
def test_every_tile_is_prefetched_exactly_once(shape, num_ctas):
    w = S(shape, jnp.bfloat16)
    tile = l2_prefetch.tile_shape(w)
    seen = [(int(r), int(c)) for cta in range(num_ctas) for r, c, ok in l2_prefetch.share(shape, tile, cta, num_ctas)
            if ok]
    rows, cols = shape[0] // tile[0], shape[1] // tile[1]
    assert sorted(seen) == [(r, c) for r in range(rows) for c in range(cols)]
    assert len(seen) == l2_prefetch.num_tiles(w)


def test_tile_shapes_and_what_fits():
    assert l2_prefetch.tile_shape(S((4096, 4096), jnp.bfloat16)) == (256, 128)
    assert l2_prefetch.tile_shape(S((512, 256), jnp.float32)) == (256, 64)
    assert l2_prefetch.tile_shape(S((100, 128), jnp.bfloat16)) == (100, 128)  # one box row
    assert l2_prefetch.tile_shape(S((300, 128), jnp.bfloat16)) is None  # 300 rows: no whole 256-row boxes
    assert l2_prefetch.tile_shape(S((256, 200), jnp.bfloat16)) is None
    assert l2_prefetch.tile_shape(S((8, 4096, 4096), jnp.bfloat16)) is None
    assert l2_prefetch.fits(S((4096, 4096), jnp.bfloat16))  # Llama-3-8B's o projection: 33.5 MB
    assert not l2_prefetch.fits(S((4096, 28672), jnp.bfloat16))  # its gate/up: 235 MB
    with pytest.raises(ValueError, match="tiles"):
        l2_prefetch.l2_prefetch(jnp.ones((300, 128), jnp.bfloat16), jnp.ones((2,)))


def test_lowers_for_the_gpu_cpu():
    """The prefetch kernel and the decode tiles with a prefetch operand (bf16 and fp8 caches, 1 and 2 splits)."""
    f = jax.jit(lambda w, a: l2_prefetch.l2_prefetch(w, a))
    with abstract_h200():
        f.trace(S((4096, 4096), jnp.bfloat16), S((8, 6144), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
    T, N, K, H, P, page_size, R = 8, 32, 8, 128, 1024, 16, 1
    i32 = lambda *shape: S(shape, jnp.int32)  # noqa: E731
    for dtype, splits in ((jnp.bfloat16, 2), (pa.FP8, 1)):
        cache = S((K, P, page_size, H), dtype)
        config = pa.TuningConfig(decode_tiles=True, num_splits=splits)
        g = jax.jit(lambda q, k, v, pt, qsl, sl, n, w, config=config: pa.ragged_paged_attention(
            q, k, v, pt, qsl, sl, n, config=config, prefetch=w))
        with abstract_h200():
            text = g.trace(S((T, N, H), jnp.bfloat16), cache, cache, i32(R, 64), i32(R + 1), i32(R), i32(),
                           S((4096, 4096), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


def test_the_interpreter_gives_the_same_output_with_a_prefetch_operand():
    batch = make_batch(61, q_lens=[1, 1], seq_lens=[40, 100], num_rows=3, extra_tokens=1, K=2, G=4, H=128)
    config = pa.TuningConfig(decode_tiles=True, num_splits=2)
    w = jax.random.normal(jax.random.key(62), (512, 256), jnp.bfloat16)
    with_w = pa.ragged_paged_attention(*batch, config=config, interpret=True, prefetch=w)
    without = pa.ragged_paged_attention(*batch, config=config, interpret=True)
    np.testing.assert_array_equal(np.asarray(with_w, np.float32), np.asarray(without, np.float32))
    assert_close(with_w, pa.paged_attention_reference(*batch), rows=2)


def test_the_mode_is_named_and_off_without_a_hopper_gpu(monkeypatch):
    monkeypatch.setenv("IE_JAX_L2_PREFETCH", "attn")
    assert ops.l2_prefetch_mode() == "0"  # CPU
    monkeypatch.setenv("IE_JAX_L2_PREFETCH", "yes")
    with pytest.raises(ValueError, match="IE_JAX_L2_PREFETCH"):
        ops.l2_prefetch_mode()


@struct.dataclass
class RecordingServing(Paged):
    """A serving context with dense causal attention over the step's own tokens that records what it was given."""

    def attend(self, q, k, v, positions, caches, layer, *, scale, sliding_window=None, prefetch=None):
        RECORDED.append(prefetch)
        return ops.attention_reference(q, k, v, scale=scale, sliding_window=sliding_window), caches


RECORDED: list = []


@pytest.mark.parametrize("mode", ["attn", "kernel"])
def test_batch_one_layers_hand_the_o_weight_to_attention_or_to_the_prefetch_kernel(monkeypatch, mode):
    cfg = ModelConfig(model_type="llama", vocab_size=263, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=64, intermediate_size=512, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    fuse_projections(model)
    kernels = []
    monkeypatch.setattr(l2_prefetch, "l2_prefetch",  # the Mosaic kernel cannot run on CPU: a stand-in
                        lambda w, after: kernels.append((w.shape, after.shape)) or jnp.zeros((128,), jnp.int32))

    def logits(m):
        monkeypatch.setattr(ops, "l2_prefetch_mode", lambda: m)
        RECORDED.clear()
        ids = jax.random.randint(jax.random.key(3), (1, 8), 0, cfg.vocab_size)
        i32 = jnp.zeros((1,), jnp.int32)
        ctx = RecordingServing(jnp.zeros((1,)), None, i32, i32[None], i32, i32, i32[0])
        with ops.kernel_backend("interpret"):  # the fused add + norm decode path
            return model(ids, jnp.arange(8)[None], ctx)[0]

    plain = logits("0")
    assert RECORDED and all(p is None for p in RECORDED) and not kernels
    got = logits(mode)
    if mode == "attn":
        assert RECORDED and all(p is not None and p.shape == (8 * 64, 256) for p in RECORDED) and not kernels
    else:
        assert all(p is None for p in RECORDED) and kernels and set(kernels) == {((8 * 64, 256), (1, 8, 768))}
    np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))


@pytest.mark.gpu
def test_gpu_prefetch_kernel_returns_zeros_and_decode_tiles_stay_exact():
    w = jax.random.normal(jax.random.key(63), (4096, 4096), jnp.bfloat16)
    token = l2_prefetch.l2_prefetch(w, jnp.ones((8, 6144), jnp.bfloat16))
    assert token.shape == (128,) and not np.asarray(token).any()
    batch = make_batch(64, q_lens=[1], seq_lens=[384], num_rows=1, extra_tokens=7, K=8, G=4, H=128)
    for splits in (1, 2):
        config = pa.TuningConfig(decode_tiles=True, num_splits=splits)
        out = pa.ragged_paged_attention(*batch, config=config, prefetch=w)
        assert_close(out, pa.paged_attention_reference(*batch), rows=1)
        assert not np.asarray(out[1:], np.float32).any()
