"""Quantized Linear layers and quantize_model: Linear's call contract, frozen storage with sharding axes,
make_linear's choice, and a tiny model quantized by each method generating through ie_jax.generate.

Tolerances (relative L2 error of the logits, f32 model with std-0.02 random weights, tiny-llama, group size 32):
the per-weight relative RMS error of each format on Gaussian weights is about 0.6% for int8 (step max|w|/127),
8% for int4 (step range/15 over 32 values) and 5% for fp8 W8A8 (3 mantissa bits on weights and activations).
The logits error tracks it, so the bounds are int8 2e-2, int4 0.15, fp8 0.08. Against the float model with the
dequantized weights put back (the same arithmetic up to rounding) weight-only formats agree to 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ie_jax
from ie_jax.config import QuantConfig
from ie_jax.models.layers import Linear, make_linear
from ie_jax.models.llama import stacked
from ie_jax.quant import Fp8Linear, Int4Linear, Int8Linear, QuantData, quantize_model
from ie_jax.sharding import make_mesh, state_shardings

CONFIGS = {"int8": QuantConfig("int8", 8), "awq": QuantConfig("awq", 4, 32), "fp8": QuantConfig("fp8", 8),
           "gptq": QuantConfig("gptq", 4, 32, desc_act=True)}
CLASSES = {"int8": Int8Linear, "awq": Int4Linear, "fp8": Fp8Linear, "gptq": Int4Linear}
TOLERANCE = {"int8": 2e-2, "awq": 0.15, "fp8": 0.08}
IDS = jnp.array([[257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]], jnp.int32)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_call_contract_matches_dense_linear_on_dequantized_kernel(method):
    quant = CONFIGS[method]
    lin = make_linear(64, 48, bias=True, axes=("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(0), quant=quant)
    assert type(lin) is CLASSES[method]
    lin.bias.set_value(jax.random.normal(jax.random.key(1), (48,)))
    dense = lin.dense()
    assert isinstance(dense, Linear) and dense.kernel.shape == (64, 48) == lin.kernel_shape
    x = jax.random.normal(jax.random.key(2), (2, 3, 64))
    y = lin(x)
    assert y.shape == (2, 3, 48) and y.dtype == jnp.float32
    assert lin(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert lin(x.astype(jnp.bfloat16), out_dtype=jnp.float32).dtype == jnp.float32
    tol = 6e-2 if method == "fp8" else 1e-5  # fp8 also quantizes x
    assert _rel(y, dense(x)) < tol


def test_quantized_storage_is_frozen_and_carries_axes():
    lin = make_linear(64, 32, bias=False, axes=("heads", "embed"), dtype=jnp.float32, rngs=nnx.Rngs(0),
                      quant=CONFIGS["gptq"])
    assert not jax.tree.leaves(nnx.state(lin, nnx.Param))  # nothing trainable
    variables = dict(nnx.to_flat_state(nnx.state(lin, QuantData)))
    assert {k[0] for k in variables} == {"q", "scales", "zeros", "perm"}
    assert variables[("q",)].get_metadata()["axes"] == ("embed", "heads")  # q [out, in]: the axes reversed
    assert variables[("scales",)].get_metadata()["axes"] == ("heads", "embed")
    assert variables[("perm",)].get_metadata()["axes"] == (None,)


def test_stacked_construction_and_sharding():
    quant = CONFIGS["awq"]
    layers = stacked(lambda r: make_linear(64, 128, bias=False, axes=("embed", "mlp"), dtype=jnp.float32, rngs=r,
                                           quant=quant), 3, nnx.Rngs(0))
    assert layers.q.shape == (3, 128, 64) and layers.q.dtype == jnp.int4  # [L, out, in]: the kernel's layout
    assert layers.scales.shape == (3, 2, 128) and layers.kernel_shape == (3, 64, 128)
    assert not np.array_equal(np.asarray(layers.q[0]), np.asarray(layers.q[1]))  # each layer its own weights
    shardings = state_shardings(nnx.state(layers), make_mesh(model=4), "tp")
    specs = {k[0]: v.get_value().spec for k, v in nnx.to_flat_state(shardings)}
    assert tuple(specs["q"]) == (None, "model", None) and tuple(specs["scales"]) == (None, None, "model")


def test_fp8_holds_q_k_major_with_the_axes_reversed():
    quant = CONFIGS["fp8"]
    layers = stacked(lambda r: make_linear(64, 128, bias=False, axes=("embed", "mlp"), dtype=jnp.float32, rngs=r,
                                           quant=quant), 3, nnx.Rngs(0))
    assert layers.q.shape == (3, 128, 64) and layers.scale.shape == (3, 128) and layers.kernel_shape == (3, 64, 128)
    assert layers.q.get_metadata()["axes"] == ("mlp", "embed") and layers.scale.get_metadata()["axes"] == ("mlp",)
    assert layers.dequantize().shape == (3, 64, 128)
    specs = {k[0]: v.get_value().spec for k, v in nnx.to_flat_state(
        state_shardings(nnx.state(layers), make_mesh(model=4), "tp"))}
    assert tuple(specs["q"]) == (None, "model", None) and tuple(specs["scale"]) == (None, "model")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = ie_jax.load_model("tiny-llama", dtype="float32", seed=3)
    return model, tokenizer, ie_jax.forward(model, IDS)


@pytest.mark.parametrize("method", ["int8", "awq", "fp8"])
def test_tiny_model_quantized_generates_within_tolerance(tiny, method):
    float_model, tokenizer, expected = tiny
    model, fake = nnx.clone(float_model), nnx.clone(float_model)
    quantize_model(model, method, group_size=32)
    assert model.config.quantization == CONFIGS[method]
    assert type(model.layers.self_attn.q_proj) is CLASSES[method]
    assert type(model.layers.mlp.down_proj) is CLASSES[method]
    assert type(model.lm_head) is Linear  # the vocabulary projection stays dense
    got = ie_jax.forward(model, IDS)
    err = _rel(got, expected)
    assert 0 < err < TOLERANCE[method], err
    if method != "fp8":  # weight-only: identical to the float model holding the dequantized weights
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(fake.layers.self_attn, name).kernel.set_value(getattr(model.layers.self_attn, name).dequantize())
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(fake.layers.mlp, name).kernel.set_value(getattr(model.layers.mlp, name).dequantize())
        assert _rel(got, ie_jax.forward(fake, IDS)) < 1e-5
    # generate runs the quantized Linears through the KV-cache path; greedy tokens follow the model's own argmax
    prompt = IDS[0].tolist()
    out = ie_jax.generate(model, tokenizer, [prompt], ie_jax.SamplingParams(temperature=0.0, max_tokens=4))
    tokens = out[0].token_ids
    assert len(tokens) == 4
    logits = ie_jax.forward(model, jnp.array([prompt + tokens[:-1]]))[0, len(prompt) - 1:]  # [4, V]
    assert tokens == [int(t) for t in jnp.argmax(logits, axis=-1)]


def test_quantize_model_refuses_bad_requests():
    model, _ = ie_jax.load_model("tiny-llama", dtype="float32")
    with pytest.raises(ValueError, match="method='int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="gptq"):
        quantize_model(model, QuantConfig("gptq", 4, 32))
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_model(model, "awq", group_size=48)
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")
    gpt2, _ = ie_jax.load_model("tiny-gpt2", dtype="float32")
    with pytest.raises(ValueError, match="gpt2"):
        quantize_model(gpt2, "int8")


def test_quant_matmul_takes_nf4_too():
    from ie_jax.quant import dequantize_nf4, quantize_nf4
    from kernels_pallas.ops import quant_matmul
    w, x = jax.random.normal(jax.random.key(0), (128, 64)) * 0.05, jax.random.normal(jax.random.key(1), (3, 128))
    q = quantize_nf4(w)
    expected = np.asarray(x) @ np.asarray(dequantize_nf4(q))
    np.testing.assert_allclose(np.asarray(quant_matmul(x, q)), expected, rtol=1e-5, atol=1e-5)


def _format_reference(lin, x, out_dtype=None):
    """The format's own reference on the Linear's weights unpacked to the format layout ([in, out])."""
    from ie_jax.quant.int4 import int4_matmul_reference
    from ie_jax.quant.int8 import int8_matmul_reference
    from kernels_pallas.quant_matmul import unpack
    reference = int8_matmul_reference if isinstance(lin, Int8Linear) else int4_matmul_reference
    return reference(x, unpack(lin.weights()), out_dtype)


PACKED_CONFIGS = {"int8": QuantConfig("int8", 8), "awq-128": QuantConfig("awq", 4, 128),
                  "gptq-act-order-128": QuantConfig("gptq", 4, 128, desc_act=True)}


@pytest.mark.parametrize("name", sorted(PACKED_CONFIGS))
def test_linear_dispatch_reference_on_cpu_kernel_under_interpret(name, monkeypatch):
    """The Linear holds the kernel's packed layout. Backend auto on CPU runs XLA's dequantize-then-dot on it, equal
    to the format reference on the unpacked weights; backend interpret sends a decode-sized bf16 call through the
    kernel body, which still matches it; above the kernel's rows (64; packed int4 128, in 64-row chunks up to there)
    even the forced backend falls back to XLA."""
    from kernels_pallas import ops
    from kernels_pallas import quant_matmul as qm
    from kernels_pallas.quant_matmul import PackedInt4, PackedInt8
    kernel_rows = []  # the row count of every call that reached the kernel
    kernel = qm.quant_matmul

    def counted(rows, *args, **kwargs):
        kernel_rows.append(rows.shape[0])
        return kernel(rows, *args, **kwargs)

    monkeypatch.setattr(qm, "quant_matmul", counted)
    quant = PACKED_CONFIGS[name]
    lin = make_linear(256, 128, bias=False, axes=("embed", "mlp"), dtype=jnp.bfloat16, rngs=nnx.Rngs(4), quant=quant)
    if quant.desc_act:  # a real act-order permutation, not the identity of round-to-nearest
        lin.perm.set_value(jax.random.permutation(jax.random.key(7), 256).astype(jnp.int32))
    assert isinstance(lin.weights(), PackedInt8 if quant.method == "int8" else PackedInt4)
    x = jax.random.normal(jax.random.key(5), (2, 3, 256), jnp.bfloat16)
    assert ops.current_backend() == "auto" and not ops.is_hopper()
    expected = _format_reference(lin, x, jnp.float32)
    np.testing.assert_allclose(np.asarray(lin(x, out_dtype=jnp.float32)), np.asarray(expected), rtol=1e-5,
                               atol=1e-5)
    assert kernel_rows == []  # auto on CPU: XLA only
    with ops.kernel_backend("interpret"):
        got = lin(x, out_dtype=jnp.float32)
        assert kernel_rows == [6]  # the 2 x 3 decode rows went through the kernel body
        big = jax.random.normal(jax.random.key(6), (129, 256), jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(lin(big, out_dtype=jnp.float32)),
                                   np.asarray(_format_reference(lin, big, jnp.float32)), rtol=1e-5, atol=1e-5)
        assert kernel_rows == [6]  # 129 rows: XLA
    assert got.shape == (2, 3, 128) and got.dtype == jnp.float32
    assert _rel(got, expected) < 1e-2


@pytest.mark.parametrize("quant", [QuantConfig("int8", 8), QuantConfig("awq", 4, 32), QuantConfig("awq", 4, 64),
                                   QuantConfig("gptq", 4, -1), QuantConfig("gptq", 4, 32, desc_act=True)],
                         ids=lambda q: f"{q.method}-{q.group_size}{'-act-order' if q.desc_act else ''}")
def test_packed_linear_matches_the_format_reference_at_any_shape(quant):
    """Backend reference, any group size, act-order, bias, stacked leading axes of x: the packed layout's XLA path
    is the format's reference arithmetic on the unpacked weights."""
    from kernels_pallas import ops
    lin = make_linear(192, 80, bias=True, axes=("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(8), quant=quant)
    lin.bias.set_value(jax.random.normal(jax.random.key(9), (80,)))
    if quant.desc_act:
        lin.perm.set_value(jax.random.permutation(jax.random.key(10), 192).astype(jnp.int32))
    x = jax.random.normal(jax.random.key(11), (3, 7, 192))
    with ops.kernel_backend("reference"):
        got = lin(x)
    expected = _format_reference(lin, x, jnp.float32) + lin.bias[...]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert _rel(got, lin.dense()(x)) < 1e-5


@pytest.mark.parametrize("method", ["int8", "awq", "fp8"])
def test_fused_projections_equal_the_parts(method):
    """Serving fuses q/k/v and gate/up (`concatenate`): one layer over the parts' columns, the same outputs."""
    from ie_jax.models.layers import fuse_linears
    quant = CONFIGS[method]
    parts = [make_linear(64, n, bias=False, axes=("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(i), quant=quant)
             for i, n in enumerate((48, 16, 16))]
    fused = fuse_linears(parts)
    assert type(fused) is CLASSES[method] and fused.kernel_shape == (64, 80)
    x = jax.random.normal(jax.random.key(12), (2, 64))
    np.testing.assert_array_equal(np.asarray(fused(x)), np.concatenate([np.asarray(p(x)) for p in parts], -1))


def test_act_order_parts_with_different_permutations_are_not_fused():
    from ie_jax.models.layers import fuse_linears
    parts = [make_linear(64, 32, bias=False, axes=("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(i),
                         quant=CONFIGS["gptq"]) for i in range(2)]
    assert fuse_linears(parts) is not None  # identity permutations (round-to-nearest): fusable
    parts[1].perm.set_value(jax.random.permutation(jax.random.key(13), 64).astype(jnp.int32))
    assert fuse_linears(parts) is None
