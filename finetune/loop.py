"""The training loop around a Trainer: progress bar (loss, tokens/s, ETA), metrics as JSONL, periodic evaluation
and checkpoints, resume, and a PNG of the loss curves at the end.

    history = fit(trainer, iter(train_ds), LoopConfig(output_dir="out", eval_every=50), eval_data=eval_ds)

Metrics lines look like {"step": 12, "loss": 1.93, "grad_norm": 0.41, "learning_rate": 2e-4, "tokens_per_sec":
..., "elapsed_sec": ...} and, on eval steps, {"step": 12, "eval_loss": ...}. This module knows nothing about
what is trained (LoRA or full) or about the data format.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path

import jax
from tqdm.auto import tqdm

from finetune.checkpoint import Checkpointer


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    output_dir: str
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end (when eval data is given)
    save_every: int = 0  # 0: checkpoint only at the end
    resume: bool = False
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        for name in ("log_every", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.log_every == 0:
            raise ValueError("log_every=0; it must be at least 1")


def fit(trainer, train_iter, config: LoopConfig, *, eval_data=None, metadata: dict | None = None) -> list[dict]:
    """Train until trainer.config.max_steps or the end of the data; returns the logged metrics."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(out / "checkpoints")
    metrics_path = out / "metrics.jsonl"
    if config.resume and checkpointer.latest_step() is not None:
        extra = checkpointer.restore(trainer)
        if extra.get("data") is not None:
            train_iter.set_state(extra["data"])
        _truncate_metrics(metrics_path, trainer.step)
    elif metrics_path.exists():
        metrics_path.unlink()
    max_steps = trainer.config.max_steps
    history: list[dict] = []
    bar = tqdm(total=max_steps, initial=trainer.step, desc=trainer.config.method, unit="step",
               disable=not config.progress, dynamic_ncols=True)
    start, tokens, last_log = time.perf_counter(), 0, time.perf_counter()
    with open(metrics_path, "a") as log:
        while trainer.step < max_steps:
            try:
                batch = next(train_iter)
            except StopIteration:
                break
            metrics = trainer.train_step(batch)
            step = trainer.step
            if step % config.log_every == 0 or step == max_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                tokens_in_window = metrics.pop("num_tokens") * min(config.log_every, step)
                tokens += tokens_in_window
                record = {"step": step, **metrics, "tokens_per_sec": tokens_in_window / max(now - last_log, 1e-9),
                          "elapsed_sec": now - start}
                last_log = now
                _write(log, record, history)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
            bar.update(1)
            if eval_data is not None and config.eval_every and step % config.eval_every == 0:
                _write(log, {"step": step, **trainer.evaluate(iter(eval_data))}, history)
            if config.save_every and step % config.save_every == 0:
                checkpointer.save(trainer, train_iter.get_state(), metadata)
        bar.close()
        if eval_data is not None and not (config.eval_every and trainer.step % config.eval_every == 0):
            _write(log, {"step": trainer.step, **trainer.evaluate(iter(eval_data))}, history)
    if checkpointer.latest_step() != trainer.step:
        checkpointer.save(trainer, train_iter.get_state(), metadata)
    checkpointer.close()
    if config.plot:
        plot_losses(metrics_path, out / "loss.png")
    return history


def _write(log, record: dict, history: list):
    log.write(json.dumps(record) + "\n")
    log.flush()
    history.append(record)


def _truncate_metrics(path: Path, step: int):
    """Drop metrics logged after the checkpoint we resume from (the killed run got further than its last save)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def read_metrics(path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_losses(metrics_path, png_path) -> Path | None:
    """Train (and eval) loss against step as a PNG; skipped with a warning when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping the loss plot (pip install matplotlib)", stacklevel=2)
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
