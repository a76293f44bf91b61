"""The offline `LLM` applies its checkpoint's generation_config.json defaults to prompts given no SamplingParams,
as vLLM's LLM does; the server's side is in tests/server (test_serve_flags.py, test_server_sampling.py)."""
from __future__ import annotations

import json

import pytest

import ie_jax
from engine.llm import LLM
from ie_jax.sampling import SamplingParams
from ie_jax.tokenizer import ByteTokenizer
from ie_jax.weights import save_hf_checkpoint

PROMPTS = ["Hello there", "The quick brown fox", "0123456789"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tiny-llama as a checkpoint directory whose generation_config.json asks for greedy decoding, 6 tokens."""
    out = tmp_path_factory.mktemp("gc") / "model"
    model, _ = ie_jax.load_model("tiny-llama", dtype="float32", seed=3)
    save_hf_checkpoint(model, model.config, out, generation_config={
        "do_sample": False, "temperature": 0.0, "top_p": 0.9, "max_new_tokens": 6, "transformers_version": "4.45.0"})
    ByteTokenizer().save_pretrained(out)  # adds the EOS ids, keeps the other fields
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 6
    return out


def test_llm_uses_the_generation_config_defaults(model_dir):
    llm = LLM(str(model_dir), dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
              page_size=8, token_buckets=(8, 16), progress=False)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.0, top_p=0.9, max_tokens=6)
    model, tok = ie_jax.load_model(model_dir, dtype="float32", progress=False)
    want = [o.token_ids for o in ie_jax.generate(model, tok, PROMPTS, SamplingParams(temperature=0.0, max_tokens=6))]
    assert max(map(len, want)) == 6  # max_new_tokens, not SamplingParams' own 16
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, use_tqdm=False)] == want
    # a None entry takes the defaults; a given SamplingParams is the request's own, whole
    own = SamplingParams(temperature=0.0, max_tokens=2)
    outs = llm.generate(PROMPTS[:2], [None, own], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [want[0], want[1][:2]]


def test_llm_checks_the_generation_config_before_loading(model_dir, tmp_path):
    for kwargs, match in ((dict(override_generation_config={"top_p": 2.0}), "top_p=2.0 must be in"),
                          (dict(override_generation_config={"do_sample": True}), "keys must be among"),
                          (dict(generation_config=str(tmp_path)), "does not exist")):
        with pytest.raises(ValueError, match=match):
            LLM(str(model_dir), progress=False, **kwargs)
