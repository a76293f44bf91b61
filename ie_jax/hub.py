"""Hugging Face Hub names as models: `load_model("Qwen/Qwen3-0.6B")`, `serve.py meta-llama/Llama-3.1-8B-Instruct`.

A model given as a Hub repo id ("org/name") that is neither a local directory nor a preset is fetched with
`huggingface_hub.snapshot_download` into the Hub's own cache (or `download_dir`), then loaded from there like any
checkpoint directory. Only what ie-jax reads is fetched: the JSON files (config, generation_config, tokenizer), the
chat templates, the tokenizer's own model files, and the safetensors weights, unless the weights are not wanted
(`load_format="dummy"`, a tokenizer alone). Pickled weights and the `original/` folder some repositories carry are
never fetched. Offline (`HF_HUB_OFFLINE=1`) the cache answers, as it does for transformers and vLLM.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
READ = ["*.json", "*.jinja", "tokenizer.model", "*.tiktoken"]
WEIGHTS = ["*.safetensors"]


def resolve_model(model: str | os.PathLike, *, weights: bool = True, revision: str | None = None,
                  download_dir: str | None = None, token: str | None = None) -> str:
    """A local path for `model`: itself when it is a directory, a preset name or anything but a Hub repo id; else
    the directory the repo was downloaded to. A failed download raises ValueError with the Hub's reason."""
    from ie_jax.presets import PRESETS

    name = str(model)
    if Path(name).is_dir() or name in PRESETS or not HUB_ID.match(name):
        return name
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # tokenizers brings it in; a trimmed environment may not have it
        raise ValueError(f"model {name!r} looks like a Hugging Face Hub name, and fetching it needs "
                         f"huggingface_hub (pip install huggingface_hub)") from e
    try:
        return snapshot_download(name, revision=revision, cache_dir=download_dir, token=token,
                                 allow_patterns=READ + (WEIGHTS if weights else []), ignore_patterns=["original/*"])
    except Exception as e:  # no network, an unknown or gated repository, a missing revision: say which
        raise ValueError(f"model {name!r} is not a local directory or a preset, and fetching it from the Hugging "
                         f"Face Hub failed: {type(e).__name__}: {e}") from e
