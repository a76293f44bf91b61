"""Logical axis names → mesh axes. Parameters name their axes (`axes` metadata: vocab, embed, heads, kv_heads,
qkv, mlp, norm); a rules table maps those names onto a `Mesh` with axes ("data", "model").

  tp    tensor parallel: the head, MLP and vocab dimensions split over "model"; activations follow (XLA SPMD).
  fsdp  tp plus the embed dimension split over "data" (parameters gathered per layer by XLA).

A dimension that the mesh axis does not divide is replicated rather than refused, so any model loads on any mesh;
the stacked layer axis (the leading axis of scanned layers) is never split.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RULES: dict[str, dict[str, str | None]] = {
    "tp": {"vocab": "model", "heads": "model", "kv_heads": "model", "qkv": "model", "mlp": "model"},
    "fsdp": {"vocab": "model", "heads": "model", "kv_heads": "model", "qkv": "model", "mlp": "model",
             "embed": "data"},
}


def make_mesh(model: int | None = None, data: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh; `model` defaults to all remaining devices."""
    devices = jax.devices() if devices is None else devices
    model = len(devices) // data if model is None else model
    if data * model > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; {len(devices)} available")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def partition_spec(axes, shape, mesh: Mesh, rules: dict[str, str | None]) -> PartitionSpec:
    """PartitionSpec for a parameter of `shape` whose trailing dims are named `axes`."""
    axes = tuple(axes or ())
    names = (None,) * (len(shape) - len(axes)) + axes  # leading stacked-layer axes stay whole
    spec = []
    for name, dim in zip(names, shape):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or dim % mesh.shape[mesh_axis]):
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def state_shardings(state, mesh: Mesh, rules: str | dict = "tp"):
    """NamedSharding for every Variable in an (abstract) nnx.State, as a tree of the same structure."""
    rules = RULES[rules] if isinstance(rules, str) else rules

    def one(var):
        spec = partition_spec(var.get_metadata().get("axes"), var.shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def single_device_shardings(state, device=None):
    device = jax.devices()[0] if device is None else device
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda v: v.replace(sharding), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
