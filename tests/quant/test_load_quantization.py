"""`load_model(..., quantization=...)` (serve.py's `--quantization`): a float checkpoint or preset is quantized as it
loads, exactly as `quantize_model` would do it afterwards; a quantized checkpoint keeps its own format."""
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import ie_jax
from ie_jax.quant.linear import Fp8Linear, Int8Linear, quantize_model
from ie_jax.weights import save_hf_checkpoint

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama3"


def _projections(model):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, (Int8Linear, Fp8Linear))]


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_checkpoint_quantized_on_load_equals_quantize_model_after(method):
    loaded, _ = ie_jax.load_model(FIXTURE, dtype="float32", quantization=method, progress=False)
    after, _ = ie_jax.load_model(FIXTURE, dtype="float32", progress=False)
    quantize_model(after, method)
    assert loaded.config.quantization == after.config.quantization
    assert loaded.config.quantization.method == method
    assert len(_projections(loaded)) == 7  # q, k, v, o, gate, up, down (stacked over the layers)
    for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(after))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_preset_quantized_on_load_stays_close_to_the_float_preset():
    ids = np.random.default_rng(0).integers(0, 256, (1, 24)).astype(np.int32)
    dense, _ = ie_jax.load_model("tiny-llama", dtype="float32", seed=2)
    fp8, _ = ie_jax.load_model("tiny-llama", dtype="float32", seed=2, quantization="fp8")
    a, b = np.asarray(ie_jax.forward(dense, ids)), np.asarray(ie_jax.forward(fp8, ids))
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < 0.08, rel  # e4m3's 3 mantissa bits: close, and not the float model itself


def test_a_quantized_checkpoint_refuses_another_method(tmp_path):
    model, _ = ie_jax.load_model(FIXTURE, dtype="float32", progress=False)
    quantize_model(model, "int8")
    save_hf_checkpoint(model, model.config, tmp_path / "int8")
    again, _ = ie_jax.load_model(tmp_path / "int8", quantization="int8", progress=False)  # its own format: fine
    assert again.config.quantization.method == "int8"
    with pytest.raises(ValueError, match="does not match quantization='fp8'"):
        ie_jax.load_model(tmp_path / "int8", quantization="fp8", progress=False)
    with pytest.raises(ValueError, match="not supported"):
        ie_jax.load_model("tiny-llama", quantization="int3")


def test_serve_takes_vllm_quantization_flag():
    import importlib.util
    path = Path(__file__).resolve().parents[2] / "scripts" / "serve.py"
    spec = importlib.util.spec_from_file_location("serve_cli", path)
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    assert serve.parse_args(["-q", "fp8"]).quantization == "fp8"
    assert serve.parse_args([]).quantization is None
    with pytest.raises(SystemExit):
        serve.parse_args(["--quantization", "int3"])
