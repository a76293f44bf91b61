"""PEFT adapters: HF PEFT's own files and logits (golden fixtures), our export round trip, merged HF checkpoints."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ie_jax
from finetune.export import load_peft_adapter, read_adapter_config, save_merged, save_peft_adapter
from finetune.lora import LoraConfig, apply_lora
from ft_helpers import random_ids, tiny

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CASES = sorted(p.name for p in (FIXTURES / "peft").iterdir())


@pytest.mark.parametrize("case", CASES)
def test_peft_golden_adapter_matches_hf(case, tmp_path):
    adapter = FIXTURES / "peft" / case
    base = FIXTURES / "hf" / json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] \
        .rsplit("/", 1)[-1]
    golden = load_file(str(adapter / "golden.safetensors"))
    model, _ = ie_jax.load_model(base, dtype="float32", progress=False)
    config = load_peft_adapter(model, adapter)
    got = np.asarray(ie_jax.forward(model, golden["input_ids"]))
    np.testing.assert_allclose(got, golden["logits"], atol=2e-4, rtol=1e-4)
    # Our export of what we imported is PEFT's file again: same keys, same values, same config essentials.
    save_peft_adapter(model, config, tmp_path / "again")
    theirs, ours = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(tmp_path / "again" /
                                                                                       "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    a, b = read_adapter_config(adapter), read_adapter_config(tmp_path / "again")
    assert (a.r, a.alpha, a.use_rslora) == (b.r, b.alpha, b.use_rslora)
    save_merged(model, tmp_path / "merged")
    merged, _ = ie_jax.load_model(tmp_path / "merged", dtype="float32", progress=False)
    np.testing.assert_allclose(np.asarray(ie_jax.forward(merged, golden["input_ids"])), golden["merged_logits"],
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_export_import_round_trip_and_merged_checkpoint(preset, tmp_path):
    model, tok = tiny(preset)
    config = LoraConfig(r=4, alpha=8, use_rslora=True, init_lora_weights=False)
    apply_lora(model, config)
    ids = random_ids(7, (2, 12))
    expected = np.asarray(ie_jax.forward(model, ids))
    save_peft_adapter(model, config, tmp_path / "adapter", base_model_name_or_path=preset)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["base_model_name_or_path"]) == (4, 8, True, preset)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    key = ("base_model.model.model.layers.1.self_attn.q_proj" if preset == "tiny-llama" else
           "base_model.model.transformer.h.1.attn.c_attn")
    assert tensors[key + ".lora_A.weight"].shape[0] == 4 and tensors[key + ".lora_B.weight"].shape[1] == 4
    fresh, _ = tiny(preset)
    load_peft_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_array_equal(np.asarray(ie_jax.forward(fresh, ids)), expected)
    save_merged(fresh, tmp_path / "merged", tok)
    assert (tmp_path / "merged" / "tokenizer.json").is_file() and (tmp_path / "merged" / "config.json").is_file()
    merged, merged_tok = ie_jax.load_model(tmp_path / "merged", dtype="float32", progress=False)
    np.testing.assert_allclose(np.asarray(ie_jax.forward(merged, ids)), expected, atol=2e-5, rtol=1e-5)
    assert merged_tok.encode("hi") == tok.encode("hi")


def test_import_errors(tmp_path):
    model, _ = tiny("tiny-llama")
    config = LoraConfig(r=4, target_modules=("q_proj",), init_lora_weights=False)
    apply_lora(model, config)
    save_peft_adapter(model, config, tmp_path / "ok")

    def variant(name, edit_tensors=None, edit_config=None):
        d = tmp_path / name
        shutil.copytree(tmp_path / "ok", d)
        if edit_tensors:
            t = load_file(str(d / "adapter_model.safetensors"))
            edit_tensors(t)
            save_file(t, str(d / "adapter_model.safetensors"))
        if edit_config:
            c = json.loads((d / "adapter_config.json").read_text())
            edit_config(c)
            (d / "adapter_config.json").write_text(json.dumps(c))
        return d

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match="missing tensor .*layers.0.self_attn.q_proj.lora_A"):
        load_peft_adapter(tiny("tiny-llama")[0], variant("missing", lambda t: t.pop(key)))
    with pytest.raises(ValueError, match=r"has shape \(4, 32\), expected \(4, 64\)"):
        load_peft_adapter(tiny("tiny-llama")[0], variant("shape", lambda t: t.update({key: t[key][:, :32]})))
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    with pytest.raises(ValueError, match="has no adapter for"):
        load_peft_adapter(tiny("tiny-llama")[0], variant("extra", lambda t: t.update({extra: t[key]})))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_peft_adapter(tiny("tiny-llama")[0], variant("dora", edit_config=lambda c: c.update(use_dora=True)))
