"""Checkpoint loading errors, dummy weights, and the save → load round trip."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ie_jax
from ie_jax.config import ModelConfig
from ie_jax.weights import CheckpointError, save_hf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def _copy(family, tmp_path) -> Path:
    dst = tmp_path / family
    shutil.copytree(FIXTURES / family, dst)
    (dst / "golden.safetensors").unlink()
    return dst


def _rewrite(path: Path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    d = _copy("llama3", tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        ie_jax.load_model(d, dtype="float32", progress=False)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    d = _copy("qwen2", tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.ones((8, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\(8, 64\).*\(32, 64\)"):
        ie_jax.load_model(d, dtype="float32", progress=False)


def test_unexpected_tensor_is_named(tmp_path):
    d = _copy("gpt2", tmp_path)
    _rewrite(d, lambda t: t.update({"transformer.h.0.attn.extra.weight": np.ones((2,), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.h\.0\.attn\.extra\.weight'"):
        ie_jax.load_model(d, dtype="float32", progress=False)


def test_unsupported_model_type_and_option(tmp_path):
    d = _copy("llama2", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type='mamba'"):
        ie_jax.load_model(d, progress=False)
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        ModelConfig.from_hf({**cfg, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        ModelConfig.from_hf({**cfg, "hidden_act": "gelu"})


def test_corrupt_header_raises_clearly(tmp_path):
    d = _copy("llama2", tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*model.safetensors"):
        ie_jax.load_model(d, progress=False)


def test_pickle_weights_are_refused(tmp_path):
    d = _copy("llama2", tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ValueError, match="pickle"):
        ie_jax.load_model(d, progress=False)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        ie_jax.load_model("not-a-preset")  # (an org/name is fetched from the Hub: tests/test_hub.py)


@pytest.mark.parametrize("family,shard_bytes", [("qwen3", 5 * 2**30), ("gpt2", 40_000), ("mistral", 60_000)])
def test_save_then_load_round_trips(family, shard_bytes, tmp_path):
    model, _ = ie_jax.load_model(FIXTURES / family, dtype="float32", progress=False)
    out = save_hf_checkpoint(model, model.config, tmp_path / "saved", max_shard_bytes=shard_bytes,
                             generation_config={"eos_token_id": 2})
    assert (out / "model.safetensors.index.json").exists() == (shard_bytes < 5 * 2**30)
    # The saved tensors are exactly the originals, under the same names.
    original = load_file(str(FIXTURES / family / "model.safetensors"))
    saved = {}
    for f in out.glob("*.safetensors"):
        saved.update(load_file(str(f)))
    assert sorted(saved) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(saved[name], original[name], err_msg=name)
    again, _ = ie_jax.load_model(out, dtype="float32", progress=False)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9)).astype(np.int32)
    np.testing.assert_array_equal(ie_jax.forward(again, ids), ie_jax.forward(model, ids))
    assert ModelConfig.from_hf(out) == model.config


def test_dummy_load_format_from_directory_and_preset():
    m, _ = ie_jax.load_model(FIXTURES / "qwen3", load_format="dummy", dtype="bfloat16", seed=3)
    assert m.config.model_type == "qwen3"
    ids = np.random.default_rng(1).integers(0, 256, (1, 7)).astype(np.int32)
    logits = np.asarray(ie_jax.forward(m, ids))
    assert logits.dtype == np.float32 and np.isfinite(logits).all() and logits.std() > 0
    m2, tok = ie_jax.load_model("tiny-gpt2", load_format="dummy")
    assert tok is not None and m2.config.is_gpt2


def test_random_models_of_one_configuration_share_the_compiled_initializer():
    """A second model of the same configuration and seed reuses the jitted initializer (no second compile) and gets
    equal weights in arrays of its own; another seed gives other weights."""
    from flax import nnx

    from ie_jax.weights import _initializer
    cfg = ie_jax.load_model("tiny-gpt2")[0].config
    before = _initializer.cache_info()
    a, b = ie_jax.weights.init_model(cfg, seed=11), ie_jax.weights.init_model(cfg, seed=11)
    after = _initializer.cache_info()
    assert after.misses == before.misses + 1 and after.hits == before.hits + 1
    la, lb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
    assert all(np.array_equal(x, y) and x is not y for x, y in zip(la, lb))
    assert a is not b and a.config == b.config
    c = ie_jax.weights.init_model(cfg, seed=12)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(nnx.state(c)), la))
