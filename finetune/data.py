"""Token ids → fixed-shape training batches with grain: next-token records, packing or padding, shuffling, epochs,
sharding across processes, and an iterator whose state is checkpointed.

Each SFT example of ids x[0..S) becomes one record  inputs = x[:-1], targets = x[1:], weights = mask[1:]  before
packing, so a target never crosses into the next document. With packing, records are laid first-fit into rows of
`seq_len` tokens; segment ids (1, 2, ... per document, 0 for padding) keep attention within a document and
positions restart at 0 for each one. Without packing each record is one row, padded with segment 0.

A batch is a dict of int32/float32 arrays [A, B, T] (A gradient-accumulation micro-batches of B rows):
  inputs, targets, weights, segment_ids, positions            (SFT)
  chosen_* and rejected_* of the same five                    (DPO; one pair per row, never packed)
The last partial batch of a finite dataset is filled with empty rows (weights 0) so shapes never change.

This module knows nothing of models or devices; it hands numpy arrays to the trainer.
"""
from __future__ import annotations

import dataclasses
import warnings

import grain
import numpy as np

from finetune.formats import DatasetError, PreferenceExample, SFTExample

SFT_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
TRUNCATION = ("truncate", "error")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    seq_len: int = 512
    batch_size: int = 8  # rows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    packing: bool = True
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1  # None: repeat forever (then the trainer's max_steps ends training)
    truncation: str = "truncate"  # examples longer than seq_len + 1 tokens: "truncate" (with a warning) or "error"

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"num_epochs={self.num_epochs} must be positive or None")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"truncation={self.truncation!r} must be one of {TRUNCATION}")

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum


def _over_length(where: str, n: int, cfg: DataConfig, num_long: list[int]):
    if cfg.truncation == "error":
        raise DatasetError(f"{where}: the example has {n} tokens, more than seq_len + 1 = {cfg.seq_len + 1} "
                           f"(use truncation='truncate' / --truncation truncate to cut it)")
    num_long[0] += 1


def _warn_truncated(num_long: int, total: int, cfg: DataConfig):
    if num_long:
        warnings.warn(f"{num_long} of {total} examples are longer than seq_len + 1 = {cfg.seq_len + 1} tokens and "
                      f"were truncated (truncation='error' refuses them instead)", stacklevel=3)


def sft_records(examples: list[SFTExample], cfg: DataConfig) -> list[dict]:
    """Next-token records (inputs, targets, weights), each at most seq_len long."""
    records, num_long = [], [0]
    for ex in examples:
        ids, mask = ex.ids, ex.mask
        if len(ids) < 2:
            continue  # nothing to predict
        if len(ids) > cfg.seq_len + 1:
            _over_length(ex.where, len(ids), cfg, num_long)
            ids, mask = ids[:cfg.seq_len + 1], mask[:cfg.seq_len + 1]
        records.append({"inputs": ids[:-1].astype(np.int32), "targets": ids[1:].astype(np.int32),
                        "weights": mask[1:].astype(np.float32)})
    _warn_truncated(num_long[0], len(examples), cfg)
    if not records:
        raise DatasetError("the dataset has no example with at least two tokens")
    return records


def _pad_row(record: dict, seq_len: int, prefix: str = "") -> dict:
    n = len(record["inputs"])
    pad = lambda x, dtype: np.pad(np.asarray(x, dtype), (0, seq_len - n))  # noqa: E731
    return {prefix + "inputs": pad(record["inputs"], np.int32), prefix + "targets": pad(record["targets"], np.int32),
            prefix + "weights": pad(record["weights"], np.float32),
            prefix + "segment_ids": pad(np.ones(n), np.int32), prefix + "positions": pad(np.arange(n), np.int32)}


def _from_packed(row: dict) -> dict:
    return {"inputs": row["inputs"], "targets": row["targets"], "weights": row["weights"],
            "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


def _source(records: list, cfg: DataConfig, process_index: int, process_count: int) -> grain.MapDataset:
    if not 0 <= process_index < process_count:
        raise ValueError(f"{process_index=} must be in [0, {process_count=})")
    ds = grain.MapDataset.source(records)[process_index::process_count]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # reshuffled every epoch by the repeat below
    return ds.repeat(cfg.num_epochs)


def _batched(rows: grain.IterDataset, cfg: DataConfig, keys) -> grain.IterDataset:
    def stack(batch: dict) -> dict:
        out = {}
        for k in keys:
            x = batch[k]
            if x.shape[0] < cfg.rows_per_step:  # the last partial batch: empty rows (segment 0, weight 0)
                x = np.concatenate([x, np.zeros((cfg.rows_per_step - x.shape[0], *x.shape[1:]), x.dtype)])
            out[k] = x.reshape(cfg.grad_accum, cfg.batch_size, *x.shape[1:])  # [A, B, T]
        return out

    return rows.batch(cfg.rows_per_step, drop_remainder=False).map(stack)


def sft_dataset(examples: list[SFTExample], cfg: DataConfig, *, process_index: int = 0,
                process_count: int = 1) -> grain.IterDataset:
    """Batches of SFT_KEYS, each [A, B, T] (see module docstring). Iterate with `iter(ds)`; the iterator has
    get_state()/set_state() for checkpoints."""
    ds = _source(sft_records(examples, cfg), cfg, process_index, process_count)
    if cfg.packing:
        T = cfg.seq_len
        rows = grain.experimental.FirstFitPackIterDataset(
            ds.to_iter_dataset(), length_struct={"inputs": T, "targets": T, "weights": T},
            num_packing_bins=max(cfg.rows_per_step, 8), shuffle_bins=False).map(_from_packed)
    else:
        rows = ds.map(lambda r: _pad_row(r, cfg.seq_len)).to_iter_dataset()
    return _batched(rows, cfg, SFT_KEYS)


def preference_records(examples: list[PreferenceExample], cfg: DataConfig) -> list[dict]:
    """One padded chosen row and one rejected row per pair; weights mark the completion's target tokens."""
    records, num_long = [], [0]
    for ex in examples:
        record = {}
        for name, completion in (("chosen", ex.chosen_ids), ("rejected", ex.rejected_ids)):
            prompt = ex.prompt_ids
            if len(prompt) + len(completion) > cfg.seq_len + 1:
                _over_length(ex.where, len(prompt) + len(completion), cfg, num_long)
                # Keep the end of the prompt (at least half the row) and the start of the completion.
                keep = max(cfg.seq_len + 1 - len(completion), (cfg.seq_len + 1) // 2)
                prompt = prompt[-keep:] if len(prompt) > keep else prompt
                completion = completion[:cfg.seq_len + 1 - len(prompt)]
            ids = np.concatenate([prompt, completion]).astype(np.int32)
            weights = np.concatenate([np.zeros(len(prompt) - 1), np.ones(len(completion))]).astype(np.float32)
            record.update(_pad_row({"inputs": ids[:-1], "targets": ids[1:], "weights": weights}, cfg.seq_len,
                                   prefix=name + "_"))
        records.append(record)
    _warn_truncated(num_long[0], len(examples), cfg)
    return records


PREFERENCE_KEYS = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in SFT_KEYS)


def preference_dataset(examples: list[PreferenceExample], cfg: DataConfig, *, process_index: int = 0,
                       process_count: int = 1, extra: dict[str, np.ndarray] | None = None) -> grain.IterDataset:
    """Batches of PREFERENCE_KEYS [A, B, T] (+ `extra` per-example arrays, e.g. precomputed reference log-probs,
    as [A, B])."""
    records = preference_records(examples, cfg)
    keys = PREFERENCE_KEYS + ("valid",)
    for i, r in enumerate(records):
        r["valid"] = np.float32(1.0)  # 0 in the empty rows that fill a last partial batch
        for k, v in (extra or {}).items():
            r[k] = np.asarray(v[i], np.float32)
    keys += tuple(extra or ())
    return _batched(_source(records, cfg, process_index, process_count).to_iter_dataset(), cfg, keys)


def count_steps(ds: grain.IterDataset) -> int:
    """Optimizer steps in one pass over a finite dataset (iterates it once, cheaply: no device work)."""
    return sum(1 for _ in ds)
