"""Serving LoRA adapters: several PEFT adapters over one base model, mixed in the same step (vLLM's `--enable-lora`,
`--max-loras`, `--max-lora-rank`, `LoRARequest`).

The device holds `max_loras` adapter *slots*. With LoRA enabled, every linear layer of the decoder (after q/k/v and
gate/up are fused for serving) becomes a `LoRASlots` layer, whose factors hold all slots side by side:

    A [in, S * P * r]     slot s, part p at columns (s * P + p) * r ... + r   (P parts: q, k, v of a fused qkv)
    B [S * P * r, out]    the same rows; part p's rows reach only part p's output columns, scaled by alpha / r

A token of slot s computes x @ A over every slot at once, zeroes the columns of the other slots, and adds that
times B: two plain GEMMs whatever the mix of adapters, no per-token gather of weights, and a base-model token
(slot -1) adds exact zeros. The extra work is S * P * r * (in + out) multiply-adds per layer and token: at
max_loras=1, r=16 on Llama-3-8B, 2.0 M against the layer's 218 M (0.9%). A rank under max_lora_rank is padded with
zeros, which changes nothing. Adapters are read once into host arrays in this layout (`AdapterWeights`), and
written into a slot when the scheduler gives them one (`AdapterSlots`, least recently used first).
"""
from __future__ import annotations

import collections
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from finetune.export import read_peft_adapter
from finetune.lora import kernel_shape, module_names
from ie_jax.models.layers import Linear

# Serving's fused projections (ie_jax/models/llama.py `fuse`) and the modules they join, in column order.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """An adapter a request runs with (vLLM's class and argument order): a PEFT directory, named."""
    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""

    def __post_init__(self):
        if not self.lora_name:
            raise ValueError("a LoRARequest needs a lora_name")
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r} needs a lora_path (a PEFT adapter directory)")


class LoRASlotWeight(nnx.Variable):
    """Adapter factors in their serving slots: frozen, written by the engine when a slot changes hands."""


class LoRASlots(nnx.Module):
    """base(x) plus, for each token, the low-rank update of the adapter in its slot (none for slot -1)."""
    takes_lora_slots = True  # ie_jax.models.layers.project hands it the step's slot per token

    def __init__(self, base: nnx.Module, widths: tuple[int, ...], max_loras: int, max_rank: int, dtype):
        shape = kernel_shape(base)
        lead, d_in, d_out = shape[:-2], shape[-2], shape[-1]
        assert sum(widths) == d_out, f"parts {widths} do not add up to the layer's {d_out} outputs"
        self.base = base
        self.block = len(widths) * max_rank  # columns of one slot
        cols = max_loras * self.block
        self.lora_a = LoRASlotWeight(jnp.zeros((*lead, d_in, cols), dtype))
        self.lora_b = LoRASlotWeight(jnp.zeros((*lead, cols, d_out), dtype))

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return kernel_shape(self.base)

    def __call__(self, x, out_dtype=None, *, lora_slots=None):  # x [..., in], lora_slots [prod(...)] int32
        out_dtype = out_dtype or x.dtype
        y = self.base(x, out_dtype)
        if lora_slots is None:
            return y
        return y + self.delta(x, lora_slots, out_dtype)

    def delta(self, x, lora_slots, out_dtype):
        """The low-rank update alone, [..., out] in out_dtype: each token's x times its slot's A, then B (zero for
        slot -1). The serving decode path adds it in f32 inside the residual add + norm kernel (one more term of
        the o / down projection's split-K sum: ie_jax.models.llama)."""
        down = jnp.dot(x, self.lora_a[...].astype(x.dtype), preferred_element_type=jnp.float32)  # [..., S*P*r]
        owner = jnp.arange(down.shape[-1], dtype=jnp.int32) // self.block  # the slot of each column
        keep = lora_slots.reshape(x.shape[:-1] + (1,)) == owner
        down = jnp.where(keep, down, 0.0).astype(x.dtype)
        return jnp.dot(down, self.lora_b[...].astype(x.dtype), preferred_element_type=out_dtype)


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """One LoRASlots layer: the adapter modules (our paths) its parts are, and each part's output width."""
    parts: tuple[str, ...]
    widths: tuple[int, ...]
    num_layers: int
    d_in: int
    d_out: int


def _part_width(cfg, name: str) -> int:
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads, "v_proj": cfg.num_kv_heads}
    return heads[name] * cfg.head_dim if name in heads else cfg.intermediate_size


def add_adapter_slots(model: nnx.Module, max_loras: int, max_rank: int) -> dict[str, SlotLayout]:
    """Wrap every decoder linear layer of `model` in a LoRASlots layer, in place (after fuse_projections). Returns
    each wrapped layer's path -> its SlotLayout. The output head and embeddings take no adapter (as in vLLM)."""
    cfg = model.config
    names = module_names(cfg)
    dtype = next(x.dtype for x in jax.tree.leaves(nnx.state(model)) if jnp.issubdtype(x.dtype, jnp.floating))
    layout = {}
    for path, module in list(nnx.iter_modules(model)):
        if not path or not (isinstance(module, Linear) or hasattr(module, "kernel_shape")):
            continue
        key, parent = ".".join(path), ".".join(path[:-1])
        if path[-1] in FUSED_PARTS:
            parts = tuple(f"{parent}.{p}" for p in FUSED_PARTS[path[-1]])
            widths = tuple(_part_width(cfg, p) for p in FUSED_PARTS[path[-1]])
        elif "{layer}" in names.get(key, ""):
            parts, widths = (key,), (kernel_shape(module)[-1],)
        else:
            continue
        shape = kernel_shape(module)
        wrapper = LoRASlots(module, widths, max_loras, max_rank, dtype)
        setattr(_get(model, path[:-1]), path[-1], wrapper)
        layout[key] = SlotLayout(parts, widths, shape[0], shape[-2], shape[-1])
    return layout


def _get(model, path):
    for p in path:
        model = getattr(model, p)
    return model


@dataclasses.dataclass
class AdapterWeights:
    """An adapter read from disk into the slot layout, on the host: layer path -> (A [L, in, P * r_max],
    B [L, P * r_max, out]) in the model's dtype (zeros for what it does not adapt)."""
    request: LoRARequest
    blocks: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def name(self) -> str:
        return self.request.lora_name


def read_adapter(request: LoRARequest, model_config, layout: dict[str, SlotLayout], max_rank: int,
                 dtype) -> AdapterWeights:
    """Read a PEFT adapter directory into the slot layout. Raises ValueError for a rank over max_lora_rank, a
    module no slot layer covers (the output head, embeddings) and factors whose shapes do not fit the model."""
    config, factors = read_peft_adapter(request.lora_path, model_config)
    if config.r > max_rank:
        raise ValueError(f"LoRA rank {config.r} is greater than max_lora_rank {max_rank}.")
    covered = {part: (key, j) for key, lay in layout.items() for j, part in enumerate(lay.parts)}
    outside = sorted(set(factors) - set(covered))
    if outside:
        raise ValueError(f"adapter {request.lora_name!r} adapts {outside}, which serving does not adapt (it adapts "
                         f"the decoder layers' linear modules)")
    r = config.r
    blocks = {}
    for key, lay in layout.items():
        a = np.zeros((lay.num_layers, lay.d_in, len(lay.parts) * max_rank), np.float32)
        b = np.zeros((lay.num_layers, len(lay.parts) * max_rank, lay.d_out), np.float32)
        offset = 0
        for j, (part, width) in enumerate(zip(lay.parts, lay.widths)):
            if part in factors:
                fa, fb = factors[part]
                if fa.shape != (lay.num_layers, lay.d_in, r) or fb.shape != (lay.num_layers, r, width):
                    raise ValueError(f"adapter {request.lora_name!r}: {part} factors have shapes {fa.shape} and "
                                     f"{fb.shape}; this model needs {(lay.num_layers, lay.d_in, r)} and "
                                     f"{(lay.num_layers, r, width)}")
                a[:, :, j * max_rank: j * max_rank + r] = fa
                b[:, j * max_rank: j * max_rank + r, offset: offset + width] = config.scaling * fb
            offset += width
        blocks[key] = (a.astype(dtype), b.astype(dtype))
    return AdapterWeights(request, blocks)


class AdapterSlots:
    """Which adapter each device slot holds and how many running requests use it (plain Python: the scheduler's).

    `acquire` gives a request its adapter's slot: the one already holding it, else an idle slot (never used
    first, then the least recently used), whose new adapter is then queued in `loads` for the engine to write
    before the step runs. With every slot in use by other adapters it returns None and the request waits."""

    def __init__(self, num_slots: int):
        self.holder: list[str | None] = [None] * num_slots
        self.users = [0] * num_slots
        self.idle = collections.OrderedDict.fromkeys(range(num_slots))  # users == 0, least recently used first
        self.loads: list[tuple[int, str]] = []  # (slot, adapter) written since the last `take_loads`

    def acquire(self, name: str) -> int | None:
        if name in self.holder:
            slot = self.holder.index(name)
        elif self.idle:
            empty = [s for s in self.idle if self.holder[s] is None]
            slot = empty[0] if empty else next(iter(self.idle))
            self.holder[slot] = name
            self.loads.append((slot, name))
        else:
            return None
        self.idle.pop(slot, None)
        self.users[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.users[slot] -= 1
        assert self.users[slot] >= 0, f"adapter slot {slot} released twice"
        if self.users[slot] == 0:
            self.idle[slot] = None

    def forget(self, name: str) -> None:
        """Drop an adapter that no request uses from its slot (removing it from the engine)."""
        if name in self.holder:
            slot = self.holder.index(name)
            assert self.users[slot] == 0, f"adapter {name!r} is in use"
            self.holder[slot] = None

    def take_loads(self) -> list[tuple[int, str]]:
        loads, self.loads = self.loads, []
        return loads


def slot_leaves(leaves, stack: str) -> dict[str, list[tuple[int | None, int, int]]]:
    """Where each LoRASlots layer's factors sit in the runner's flat weight list (`leaves`: (path, array) as
    flattened from (state, layer_states)): layer path -> [(layer, or None for a stacked array, index of A, index
    of B)]. The stacked arrays emptied by unrolling the layers are left out."""
    found: dict[str, dict] = {}
    for i, (path, array) in enumerate(leaves):
        if array.size == 0:
            continue
        keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path]
        if keys and keys[-1] == "value":
            keys = keys[:-1]
        if not keys or keys[-1] not in ("lora_a", "lora_b"):
            continue
        layer, module = (keys[1], [stack, *keys[2:-1]]) if keys[0] == 1 else (None, keys[1:-1])
        found.setdefault(".".join(map(str, module)), {}).setdefault(layer, {})[keys[-1]] = i
    return {key: [(layer, ab["lora_a"], ab["lora_b"]) for layer, ab in sorted(layers.items(), key=lambda t: t[0] or 0)]
            for key, layers in found.items()}


@jax.jit
def _put_cols(a, block, start):  # a [..., in, cols] <- block [..., in, w] at column `start`
    return jax.lax.dynamic_update_slice_in_dim(a, block.astype(a.dtype), start, a.ndim - 1)


@jax.jit
def _put_rows(a, block, start):  # a [..., rows, out] <- block [..., w, out] at row `start`
    return jax.lax.dynamic_update_slice_in_dim(a, block.astype(a.dtype), start, a.ndim - 2)


def empty_adapter(layout: dict[str, SlotLayout], max_rank: int, dtype) -> AdapterWeights:
    """All-zero factors: what an empty slot holds (written once at start-up, which compiles the slot writers)."""
    blocks = {key: (np.zeros((lay.num_layers, lay.d_in, len(lay.parts) * max_rank), dtype),
                    np.zeros((lay.num_layers, len(lay.parts) * max_rank, lay.d_out), dtype))
              for key, lay in layout.items()}
    return AdapterWeights(LoRARequest("(empty)", 0, "-"), blocks)


def write_adapter(weights: list, leaves: dict, slot: int, adapter: AdapterWeights) -> None:
    """Put `adapter` into device slot `slot`: each LoRASlots factor in the flat weight list `weights` (see
    `slot_leaves`) is replaced by a copy with that slot's columns of A and rows of B rewritten. Copies, not
    in-place updates: a step still in flight keeps reading the arrays it was given."""
    for key, places in leaves.items():
        a, b = adapter.blocks[key]
        start = slot * a.shape[-1]
        for layer, ia, ib in places:
            block_a, block_b = (a, b) if layer is None else (a[layer], b[layer])
            weights[ia] = _put_cols(weights[ia], block_a, start)
            weights[ib] = _put_rows(weights[ib], block_b, start)


def write_random_adapter(out_dir, model_config, layout: dict[str, SlotLayout], rank: int, seed: int = 0):
    """A PEFT adapter of random factors on every module the slots cover, at `rank` (benchmarks: the dummy-weight
    models have no trained adapters). Returns the directory."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    names, rng = module_names(model_config), np.random.default_rng(seed)
    tensors = {}
    for lay in layout.values():
        for part, width in zip(lay.parts, lay.widths):
            for layer in range(lay.num_layers):
                key = f"base_model.model.{names[part].format(layer=layer)}"
                a = rng.uniform(-1, 1, (rank, lay.d_in)) / np.sqrt(lay.d_in)
                tensors[f"{key}.lora_A.weight"] = a.astype(np.float32)
                tensors[f"{key}.lora_B.weight"] = (0.01 * rng.standard_normal((width, rank))).astype(np.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({p.rsplit(".", 1)[-1] for lay in layout.values() for p in lay.parts})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none"}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def runtime_lora_updates() -> bool:
    """Whether /v1/load_lora_adapter and /v1/unload_lora_adapter exist: only when asked for, as vLLM has them
    (its environment variable, VLLM_ALLOW_RUNTIME_LORA_UPDATING, or IE_JAX_ALLOW_RUNTIME_LORA_UPDATING)."""
    names = ("IE_JAX_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    return any(os.environ.get(n, "").lower() in ("1", "true", "yes") for n in names)
