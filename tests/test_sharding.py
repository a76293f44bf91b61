"""Tensor-parallel sharding over 8 CPU devices gives the same logits as one device."""
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import ie_jax
from ie_jax.sharding import make_mesh

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


@pytest.mark.parametrize("family,rules", [("llama3", "tp"), ("qwen3", "tp"), ("gpt2", "tp"), ("mistral", "fsdp")])
def test_sharded_logits_equal_unsharded(family, rules):
    assert len(jax.devices()) == 8, "conftest asks for 8 host devices"
    mesh = make_mesh(model=4, data=2) if rules == "fsdp" else make_mesh(model=8)
    single, _ = ie_jax.load_model(FIXTURES / family, dtype="float32", progress=False)
    sharded, _ = ie_jax.load_model(FIXTURES / family, dtype="float32", mesh=mesh, rules=rules, progress=False)
    # The weights really are split: some parameter lives in pieces on several devices.
    shards = [len({s.index for s in v.get_value().addressable_shards})
              for v in jax.tree.leaves(nnx.state(sharded, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))]
    assert max(shards) == (mesh.size if rules == "fsdp" else mesh.shape["model"])
    ids = np.random.default_rng(0).integers(0, single.config.vocab_size, (2, 16)).astype(np.int32)
    np.testing.assert_allclose(ie_jax.forward(sharded, ids), ie_jax.forward(single, ids), rtol=1e-5, atol=1e-5)
