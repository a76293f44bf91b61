"""Adapters in the PEFT on-disk format, and merged models as HF checkpoints.

    save_peft_adapter(model, lora_config, "out/adapter", base_model_name_or_path="meta-llama/...")
    load_peft_adapter(model, "out/adapter")          # wraps the model's layers and fills the factors
    save_merged(model, "out/merged", tokenizer)      # folds the adapters in; config.json + safetensors + tokenizer

PEFT layout: adapter_config.json and adapter_model.safetensors with one pair of tensors per adapted module and layer,
  base_model.model.<HF module name>.lora_A.weight  [r, in]
  base_model.model.<HF module name>.lora_B.weight  [out, r]
(our factors are A [in, r], B [r, out]: the transposes). The scaling is lora_alpha / r, or lora_alpha / sqrt(r)
with use_rslora. HF module names come from the weight table (lora.module_names), so they match what transformers
builds for the same checkpoint. Options PEFT has and this stack does not (per-module ranks, DoRA, bias training,
modules_to_save) are refused on import, naming the option.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from finetune.lora import LoraConfig, apply_lora, lora_modules, merge_lora, module_names
from ie_jax.weights import save_hf_checkpoint

PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def _peft_tensors(model, dtype=np.float32) -> dict[str, np.ndarray]:
    names = module_names(model.config)
    tensors = {}
    for path, module in lora_modules(model):
        template = names[path]
        a = np.asarray(jax.device_get(module.lora_a[...]), np.float32)  # [L, in, r] or [in, r]
        b = np.asarray(jax.device_get(module.lora_b[...]), np.float32)  # [L, r, out] or [r, out]
        layers = [(template.format(layer=i), a[i], b[i]) for i in range(a.shape[0])] if "{layer}" in template \
            else [(template, a, b)]
        for name, ai, bi in layers:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(ai.T.astype(dtype))
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(bi.T.astype(dtype))
    return tensors


def adapter_config(model, config: LoraConfig, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA on a causal LM."""
    targets = config.target_modules
    if targets == "all-linear":  # write the names themselves: readers need not know our "all-linear" expansion
        names = module_names(model.config)
        targets = sorted({names[p].rsplit(".", 1)[-1] for p, _ in lora_modules(model)})
    elif not isinstance(targets, str):
        targets = sorted(targets)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": bool(model.config.is_gpt2),
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "revision": None,
    }


def save_peft_adapter(model, config: LoraConfig, out_dir, *, base_model_name_or_path: str | None = None,
                      dtype=np.float32) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _peft_tensors(model, dtype)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = adapter_config(model, config, base_model_name_or_path)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir) -> LoraConfig:
    """The LoraConfig an adapter directory describes; options this stack cannot honour raise ValueError."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {adapter_dir} a PEFT adapter directory?")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type={cfg.get('peft_type')!r} in {path}: only LORA adapters are supported")
    for key, unsupported in (("rank_pattern", {}), ("alpha_pattern", {}), ("use_dora", False), ("bias", "none"),
                             ("modules_to_save", None), ("layers_to_transform", None)):
        value = cfg.get(key, unsupported)
        if value not in (unsupported, None, {}, [], False, "none"):
            raise ValueError(f"{key}={value!r} in {path} is not supported")
    targets = cfg.get("target_modules")
    if targets is None:
        raise ValueError(f"{path} has no target_modules")
    return LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                      target_modules=targets if isinstance(targets, str) else tuple(targets),
                      use_rslora=bool(cfg.get("use_rslora", False)))


def _adapter_tensors(adapter_dir) -> tuple[Path, dict[str, np.ndarray]]:
    file = Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (pickled adapter_model.bin files are never loaded)")
    # Older PEFT files may carry the adapter name: "...q_proj.lora_A.default.weight".
    return file, {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v
                  for k, v in load_file(str(file)).items()}


def read_peft_adapter(adapter_dir, model_config) -> tuple[LoraConfig, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """An adapter's config and factors without a model: our module path ("layers.self_attn.q_proj") -> (A, B) in
    f32 and our layout, A [L, in, r] and B [L, r, out] for decoder layers ([in, r], [r, out] otherwise). The
    serving engine loads adapters this way. A module with some layers' tensors but not all, a tensor no module of
    `model_config` has, or a factor whose rank is not the config's r raises, naming the tensor."""
    config = read_adapter_config(adapter_dir)
    file, tensors = _adapter_tensors(adapter_dir)
    factors, used = {}, set()
    for path, template in module_names(model_config).items():
        layers = list(range(model_config.num_layers)) if "{layer}" in template else [None]
        keys = [{kind: f"{PREFIX}{template if i is None else template.format(layer=i)}.{kind}.weight"
                 for kind in ("lora_A", "lora_B")} for i in layers]
        found = [k for pair in keys for k in pair.values() if k in tensors]
        if not found:
            continue
        missing = [k for pair in keys for k in pair.values() if k not in tensors]
        if missing:
            raise ValueError(f"adapter {file} has {found[0]!r} but is missing {missing[0]!r}: an adapted module "
                             f"needs lora_A and lora_B on every layer")
        a = [tensors[pair["lora_A"]].T.astype(np.float32) for pair in keys]  # PEFT [r, in] -> [in, r]
        b = [tensors[pair["lora_B"]].T.astype(np.float32) for pair in keys]  # PEFT [out, r] -> [r, out]
        for pair, ai, bi in zip(keys, a, b):
            if ai.shape[1] != config.r or bi.shape[0] != config.r:
                raise ValueError(f"tensor {pair['lora_A']!r} has rank {ai.shape[1]} and its lora_B "
                                 f"{bi.shape[0]}; adapter_config.json says r={config.r}")
        used.update(found)
        factors[path] = (np.stack(a), np.stack(b)) if layers != [None] else (a[0], b[0])
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"adapter {file} has {len(unexpected)} tensor(s) the model has no module for, e.g. "
                         f"{unexpected[:3]}")
    if not factors:
        raise ValueError(f"adapter {file} holds no LoRA factors")
    return config, factors


def load_peft_adapter(model, adapter_dir) -> LoraConfig:
    """Wrap `model`'s targeted layers and load the adapter's factors; missing, unexpected or mis-shaped tensors
    raise, naming the tensor."""
    config = read_adapter_config(adapter_dir)
    file, tensors = _adapter_tensors(adapter_dir)
    apply_lora(model, config)
    names = module_names(model.config)
    used = set()
    for path, module in lora_modules(model):
        template = names[path]
        for attr, kind in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            var = getattr(module, attr)
            layers = range(var.shape[0]) if "{layer}" in template else [None]
            values = []
            for i in layers:
                key = f"{PREFIX}{template.format(layer=i) if i is not None else template}.{kind}.weight"
                if key not in tensors:
                    raise ValueError(f"adapter {file} is missing tensor {key!r}")
                value = tensors[key].T
                want = var.shape[1:] if i is not None else var.shape
                if value.shape != tuple(want):
                    raise ValueError(f"tensor {key!r} has shape {tensors[key].shape}, expected "
                                     f"{tuple(want)[::-1]} (PEFT layout)")
                values.append(value)
                used.add(key)
            value = np.stack(values) if layers != [None] else values[0]
            var.set_value(jax.device_put(jnp.asarray(value, jnp.float32), getattr(var[...], "sharding", None)))
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"adapter {file} has {len(unexpected)} tensor(s) the model has no adapter for, e.g. "
                         f"{unexpected[:3]}")
    return config


def save_tokenizer(tokenizer, out_dir, source_dir=None) -> None:
    """Write the tokenizer files next to a checkpoint: copied from the source checkpoint when it has them,
    else written by the tokenizer itself (the byte tokenizer)."""
    out = Path(out_dir)
    copied = False
    if source_dir is not None and Path(source_dir).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy(Path(source_dir) / name, out / name)
                copied = True
    if not copied and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)


def save_merged(model, out_dir, tokenizer=None, *, source_dir=None, dtype=None) -> Path:
    """Fold the adapters into the base (in place) and write an HF checkpoint (+ tokenizer files)."""
    merge_lora(model)
    out = save_hf_checkpoint(model, model.config, out_dir, dtype=dtype)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out, source_dir)
    return out
