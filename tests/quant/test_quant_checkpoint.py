"""Quantized checkpoints on disk: save_quantized -> load_model gives identical arrays for each method; hand-built
GPTQ (act-order) and HF FP8 checkpoints load to the weights they encode; dummy weights; clear errors."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import ie_jax
from ie_jax.config import ModelConfig, QuantConfig
from ie_jax.quant import Fp8Linear, Int4Linear, dequantize_int4, gptq_pack, quantize_int4, quantize_model
from ie_jax.quant.checkpoint import save_quantized
from ie_jax.sharding import make_mesh
from ie_jax.weights import CheckpointError, hf_tensors

PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
IDS = jnp.array([[257, 10, 20, 30, 40, 50]], jnp.int32)


@pytest.fixture(scope="module")
def tiny():
    model, _ = ie_jax.load_model("tiny-llama", dtype="float32", seed=4)
    return model


def _flat(model):
    return {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(model))}


def _projections(model):
    for block, names in PROJ.items():
        for name in names:
            yield f"{block}.{name}", getattr(getattr(model.layers, block), name)


@pytest.mark.parametrize("method", ["int8", "awq", "fp8"])
def test_save_then_load_gives_identical_arrays(tiny, method, tmp_path):
    model = quantize_model(nnx.clone(tiny), method, group_size=32)
    save_quantized(model, tmp_path, max_shard_bytes=40_000)  # several shards: a module's tensors may straddle
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == model.config.quantization.to_hf()
    assert config["torch_dtype"] == "float32"
    if method == "awq":  # AutoAWQ's tensor names and dtypes
        t = {k: v for f in tmp_path.glob("*.safetensors") for k, v in load_file(str(f)).items()}
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
        assert t["model.layers.1.mlp.down_proj.qweight"].dtype == np.int32
        assert t["model.layers.1.mlp.down_proj.qweight"].shape == (128, 8)
        assert t["model.layers.1.mlp.down_proj.scales"].dtype == np.float16
        assert "model.layers.1.mlp.down_proj.weight" not in t and "lm_head.weight" in t
    loaded, _ = ie_jax.load_model(tmp_path, dtype="float32", progress=False)
    assert loaded.config == model.config
    a, b = _flat(model), _flat(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    np.testing.assert_array_equal(np.asarray(ie_jax.forward(loaded, IDS)), np.asarray(ie_jax.forward(model, IDS)))


def test_sharded_load_places_quantized_arrays(tiny, tmp_path):
    save_quantized(quantize_model(nnx.clone(tiny), "awq", group_size=32), tmp_path)
    mesh = make_mesh(model=2)
    loaded, _ = ie_jax.load_model(tmp_path, dtype="float32", mesh=mesh, progress=False)
    assert tuple(loaded.layers.self_attn.q_proj.q[...].sharding.spec) == (None, "model", None)  # q [L, out, in]
    assert tuple(loaded.layers.self_attn.o_proj.scales[...].sharding.spec) == (None, "model", None)
    assert np.isfinite(np.asarray(ie_jax.forward(loaded, IDS))).all()


def _write(path, tensors, config):
    path.mkdir(exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def _dense_tensors(model):
    return {n: v for n, v in hf_tensors(model, model.config) if not n.endswith("proj.weight")}


def test_gptq_act_order_checkpoint_loads_and_round_trips(tiny, tmp_path):
    cfg = tiny.config
    tensors, expected = _dense_tensors(tiny), {}
    for path, lin in _projections(tiny):
        for layer in range(cfg.num_layers):
            w = lin.kernel[...][layer]  # [K, N]
            perm = jax.random.permutation(jax.random.key(layer * 100 + len(path)), w.shape[0])
            qw = quantize_int4(w, 32, perm=perm)
            expected[(path, layer)] = np.asarray(dequantize_int4(qw))
            for t, v in gptq_pack(qw).items():
                tensors[f"model.layers.{layer}.{path}.{t}"] = np.asarray(v)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float16)  # GPTQ writers add these
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
    src = _write(tmp_path / "gptq", tensors, {**cfg.to_hf(), "quantization_config": quant})
    loaded, _ = ie_jax.load_model(src, dtype="float32", progress=False)
    assert loaded.config.quantization == QuantConfig("gptq", 4, 32, desc_act=True, sym=False)
    for path, lin in _projections(loaded):
        assert isinstance(lin, Int4Linear) and lin.perm is not None
        for layer in range(cfg.num_layers):
            np.testing.assert_array_equal(np.asarray(lin.dequantize())[layer], expected[(path, layer)])
    save_quantized(loaded, tmp_path / "again")
    again, _ = ie_jax.load_model(tmp_path / "again", dtype="float32", progress=False)
    a, b = _flat(loaded), _flat(again)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_hf_fp8_checkpoint_with_per_tensor_and_input_scales(tiny, tmp_path):
    cfg = tiny.config
    tensors, expected = _dense_tensors(tiny), {}
    rng = np.random.default_rng(0)
    for path, lin in _projections(tiny):
        for layer in range(cfg.num_layers):
            w = np.asarray(lin.kernel[...][layer]).T  # HF [out, in]
            scale = np.float32(np.abs(w).max() / 448)
            q = np.ascontiguousarray((w / scale).astype(ml_dtypes.float8_e4m3fn))
            prefix = f"model.layers.{layer}.{path}"
            tensors.update({f"{prefix}.weight": q, f"{prefix}.weight_scale": np.array(scale, np.float32),
                            f"{prefix}.input_scale": np.array(rng.uniform(0.01, 0.02), np.float32)})
            expected[(path, layer)] = (q.astype(np.float32) * scale).T
    # activation_scheme says dynamic, but the checkpoint carries input scales: they are used
    src = _write(tmp_path / "fp8", tensors, {**cfg.to_hf(), "quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}})
    loaded, _ = ie_jax.load_model(src, dtype="float32", progress=False)
    assert loaded.config.quantization.activation_scheme == "static"
    for path, lin in _projections(loaded):
        assert isinstance(lin, Fp8Linear)
        for layer in range(cfg.num_layers):
            weight = tensors[f"model.layers.{layer}.{path}.weight"]  # [out, in]
            assert np.array_equal(np.asarray(lin.q[...][layer]).view(np.uint8), weight.view(np.uint8))  # as is
            np.testing.assert_array_equal(np.asarray(lin.dequantize())[layer], expected[(path, layer)])
            assert float(lin.input_scale[...][layer]) == float(tensors[f"model.layers.{layer}.{path}.input_scale"])
    ref = ie_jax.forward(tiny, IDS)
    assert float(jnp.linalg.norm(ie_jax.forward(loaded, IDS) - ref) / jnp.linalg.norm(ref)) < 0.1
    # a weight stored [in, out] is refused, naming the tensor and both shapes
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    bad = _write(tmp_path / "fp8_t", tensors, {**cfg.to_hf(), "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(CheckpointError, match=r"down_proj.*\(128, 64\).*\(64, 128\)"):
        ie_jax.load_model(bad, dtype="float32", progress=False)


@pytest.mark.parametrize("method", ["int8", "awq", "gptq", "fp8"])
def test_dummy_load_builds_random_quantized_weights(tiny, method, tmp_path):
    quant = {"int8": {"quant_method": "int8", "bits": 8}, "fp8": {"quant_method": "fp8"},
             "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True},
             "gptq": {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True}}[method]
    src = tmp_path / "dummy"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**tiny.config.to_hf(), "quantization_config": quant}))
    model, _ = ie_jax.load_model(src, dtype="bfloat16", load_format="dummy", progress=False)
    lin = model.layers.mlp.down_proj
    assert lin.kernel_shape == (2, 128, 64) and model.config.quantization.method == method
    w = np.asarray(lin.dequantize(jnp.float32))
    assert 0.01 < w.std() < 0.03 and not np.array_equal(w[0], w[1])
    assert np.isfinite(np.asarray(ie_jax.forward(model, IDS))).all()


@pytest.mark.parametrize("quant, match", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits=8"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"}, "gptq_v2"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version='gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "marlin"}, "version='marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point=False"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "modules_to_not_convert": ["mlp"]}, "modules_to_not"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "activation_scheme": "tensorwise"}, "activation_scheme='tensorwise'"),
    ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 0}, "group_size=0"),
])
def test_unsupported_quantization_configs_raise(tiny, quant, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**tiny.config.to_hf(), "quantization_config": quant})


def test_gpt2_with_quantization_config_raises():
    cfg = ie_jax.PRESETS["tiny-gpt2"].to_hf()
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_hf({**cfg, "quantization_config": {"quant_method": "int8", "bits": 8}})


def test_broken_checkpoints_name_the_tensor(tiny, tmp_path):
    save_quantized(quantize_model(nnx.clone(tiny), "awq", group_size=32), tmp_path / "ok")
    good = load_file(str(tmp_path / "ok" / "model.safetensors"))
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    def broken(name, edit):
        t = dict(good)
        edit(t)
        return _write(tmp_path / name, t, config)

    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.qzeros"):
        ie_jax.load_model(broken("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros")), progress=False)
    bad = lambda t: t.update({"model.layers.0.self_attn.k_proj.scales": np.ones((1, 32), np.float16)})  # noqa: E731
    with pytest.raises(CheckpointError, match=r"k_proj\.scales.*\(1, 32\).*\(2, 32\)"):
        ie_jax.load_model(broken("shape", bad), progress=False)
    bias = lambda t: t.update({"model.layers.0.mlp.up_proj.bias": np.ones((128,), np.float16)})  # noqa: E731
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.up_proj\.bias'"):
        ie_jax.load_model(broken("bias", bias), progress=False)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny, tmp_path / "float")
