"""Hub names as models (ie_jax/hub.py): an "org/name" that is no local directory or preset is fetched with
huggingface_hub (stubbed here: no network in tests) and then loads like the directory it became."""
from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest

import ie_jax
from engine.llm import LLM
from ie_jax.hub import resolve_model
from ie_jax.sampling import SamplingParams, model_sampling_defaults

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "llama3"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """snapshot_download stubbed: "org/llama3" is the llama3 fixture; other names fail as offline ones do."""
    calls = []
    local = tmp_path / "snapshot"
    shutil.copytree(FIXTURE, local)

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id != "org/llama3":
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id}: not in the cache and the Hub is offline")
        return str(local)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls, local


def test_hub_names_are_fetched_then_loaded_like_their_directory(hub):
    calls, local = hub
    model, _ = ie_jax.load_model("org/llama3", dtype="float32", progress=False, revision="v1")
    (name, kwargs), = calls
    assert name == "org/llama3" and kwargs["revision"] == "v1" and "*.safetensors" in kwargs["allow_patterns"]
    assert "*.json" in kwargs["allow_patterns"] and kwargs["ignore_patterns"] == ["original/*"]
    want, _ = ie_jax.load_model(FIXTURE, dtype="float32", progress=False)
    ids = np.random.default_rng(0).integers(0, 256, (1, 12))
    np.testing.assert_array_equal(np.asarray(ie_jax.forward(model, ids)), np.asarray(ie_jax.forward(want, ids)))
    ie_jax.load_model("org/llama3", load_format="dummy", dtype="float32", progress=False)
    assert "*.safetensors" not in calls[-1][1]["allow_patterns"]  # random weights: the configs are enough


def test_local_directories_and_presets_are_never_fetched(hub, tmp_path, monkeypatch):
    calls, _ = hub
    assert resolve_model(str(FIXTURE)) == str(FIXTURE)
    assert resolve_model("tiny-llama") == "tiny-llama"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)  # a relative directory that reads like org/name
    assert resolve_model("models/mine") == "models/mine"
    assert calls == []


def test_a_failed_fetch_says_why(hub):
    with pytest.raises(ValueError, match=r"'org/missing' is not a local directory or a preset, and fetching it from "
                                         r"the Hugging Face Hub failed: LocalEntryNotFoundError: org/missing: not in"):
        ie_jax.load_model("org/missing")
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        ie_jax.load_model("no-such-preset")  # not a Hub name: nothing is fetched
    assert [name for name, _ in hub[0]] == ["org/missing"]


def test_llm_reads_the_fetched_generation_config(hub):
    calls, local = hub
    llm = LLM("org/llama3", dtype="float32", max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16,
              page_size=8, progress=False)
    assert llm.default_sampling == model_sampling_defaults(local)
    ids = [5, 17, 99, 3]
    model, _ = ie_jax.load_model(FIXTURE, dtype="float32", progress=False)  # (the engine keeps its own weights)
    want = ie_jax.generate(model, None, [ids], SamplingParams(temperature=0.0, max_tokens=6))[0].token_ids
    got = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0].outputs[0].token_ids
    assert got == want and len(calls) == 1  # fetched once, before the model loaded
