"""Training checkpoints with orbax: the trainable params, the optimizer state, the step, the grain iterator state
and a little metadata, saved together under `<dir>/<step>/`.

Params and optimizer state are stored as their flat lists of leaves; the live trainer supplies the tree structure
(and the shardings) on restore, so a checkpoint restores onto any mesh the trainer was built with. Restoring the
iterator state and the step makes a resumed run draw the same batches and dropout keys as an uninterrupted one:
the loss curve continues bit-identically.

This module does not know what the params mean (LoRA factors or a whole model): export.py writes the artifacts
people load elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory, *, max_to_keep: int | None = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, trainer, data_state: dict | None, metadata: dict | None = None, *, wait: bool = True) -> None:
        arrays = {"params": jax.tree.leaves(trainer.params), "opt_state": jax.tree.leaves(trainer.opt_state)}
        extra = {"step": trainer.step, "data": data_state, "metadata": metadata or {}}
        self.manager.save(trainer.step, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), extra=ocp.args.JsonSave(json.loads(json.dumps(extra)))))
        if wait:
            self.manager.wait_until_finished()

    def restore(self, trainer, step: int | None = None) -> dict:
        """Load a checkpoint into `trainer` (params, optimizer state, step); returns the extra dict
        (`data`: the iterator state to hand to `iterator.set_state`, `metadata`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = {"params": [_abstract(x) for x in jax.tree.leaves(trainer.params)],
                    "opt_state": [_abstract(x) for x in jax.tree.leaves(trainer.opt_state)]}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        arrays, extra = restored["arrays"], restored["extra"]
        trainer.params = jax.tree.unflatten(jax.tree.structure(trainer.params), arrays["params"])
        trainer.opt_state = jax.tree.unflatten(jax.tree.structure(trainer.opt_state), arrays["opt_state"])
        trainer.step = int(extra["step"])
        return extra

    def close(self):
        self.manager.close()


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
