"""Calibration text for the tools that need activations (AWQ, fp8 KV-cache scales): the project's own README and
docs unless a file is given, tokenized into fixed-length rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the repository root (an editable install or a checkout)
BUNDLED_CALIB = ("README.md", "docs/*.md")  # the project's own prose, relative to the repository root


def bundled_calibration_text() -> tuple[str, list[str]]:
    """The project's own README and docs, joined: (text, file names relative to the repository root)."""
    files = [f for pattern in BUNDLED_CALIB for f in sorted(ROOT.glob(pattern)) if f.is_file()]
    if not files:
        raise ValueError(f"no bundled calibration text found under {ROOT} ({BUNDLED_CALIB}); give a text file "
                         f"(quantize.py --calib FILE)")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files), [str(f.relative_to(ROOT)) for f in files]


def calibration_ids(tokenizer, text: str, num_samples: int, seq_len: int, max_len: int) -> np.ndarray:
    """Tokenize calibration text into rows [B, S] (S shrinks to the text or the model's context when shorter)."""
    from ie_jax.quant.awq import calibration_rows
    if tokenizer is None:
        raise ValueError("calibration (AWQ, KV-cache scales) needs the model's tokenizer (tokenizer.json beside "
                         "the weights)")
    ids = tokenizer.encode(text, add_special_tokens=False)
    seq_len = min(seq_len, max_len, len(ids))
    if seq_len < 2:
        raise ValueError(f"the calibration text has {len(ids)} tokens; it needs at least a few hundred")
    return calibration_rows(ids, num_samples, seq_len)
