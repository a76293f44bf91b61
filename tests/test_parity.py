"""HF transformers parity for every family: logits and greedy tokens against golden fixtures.

The fixtures (tests/fixtures/hf/*) are tiny random-init HF checkpoints made by tests/fixtures/make_hf_fixtures.py.
Where torch + transformers are importable, the live test regenerates one with HF and compares again.
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import ie_jax

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ["llama2", "llama3", "llama32", "mistral", "qwen2", "qwen3", "gpt2", "llama3_sharded"]


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _check_dir(path: Path):
    model, _ = ie_jax.load_model(path, dtype="float32", progress=False)
    golden = load_file(str(path / "golden.safetensors"))
    logits = ie_jax.forward(model, golden["input_ids"].astype(np.int32))
    assert logits.shape == golden["logits"].shape
    assert _rel_err(logits, golden["logits"]) <= 1e-4
    prompt = golden["prompt_ids"][0].tolist()
    expected = golden["greedy_ids"][0, len(prompt):].tolist()
    out = ie_jax.generate(model, None, [prompt], ie_jax.SamplingParams(temperature=0.0, max_tokens=32,
                                                                       ignore_eos=True))
    assert out[0].token_ids == expected
    return model, golden


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_match_hf(family):
    _check_dir(FIXTURES / family)


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_greedy_without_cache_and_right_padding_match_hf(family):
    model, golden = _check_dir(FIXTURES / family)
    prompt = golden["prompt_ids"][0].tolist()
    expected = golden["greedy_ids"][0, len(prompt):].tolist()
    params = ie_jax.SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    # A shorter second prompt forces padding; the first row must not notice it.
    prompts = [prompt, prompt[:5]]
    for kwargs in ({"use_cache": False}, {"padding_side": "right"}, {"padding_side": "left"}):
        out = ie_jax.generate(model, None, prompts, params, **kwargs)
        assert out[0].token_ids == expected, kwargs
    short = ie_jax.generate(model, None, [prompt[:5]], params)[0].token_ids
    assert ie_jax.generate(model, None, prompts, params, padding_side="right")[1].token_ids == short


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
                    reason="torch + transformers not installed: the golden fixtures stand in for them")
@pytest.mark.parametrize("family", ["llama3", "qwen3", "gpt2"])
def test_live_hf_regenerated_fixture(family, tmp_path):
    sys.path.insert(0, str(FIXTURES.parent))
    try:
        from make_hf_fixtures import make_fixture
    finally:
        sys.path.pop(0)
    _check_dir(make_fixture(family, tmp_path))
