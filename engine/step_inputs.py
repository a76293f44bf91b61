"""What a serving step takes from the host: `StepInputs`, the fixed-shape arrays of one step, and how they cross to
the device (one packed int32 buffer); `SlotState`, the per-slot host state they are gathered from. The runner
(engine/runner.py) fills them; the jitted step unpacks them."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NUM_BANNED = 8  # eos/stop ids banned per row while min_tokens is not reached
_ALIGN = 64  # int32 elements: 256 bytes, the alignment of each field in the packed step inputs


@struct.dataclass
class StepInputs:
    input_ids: jax.Array  # [T] int32
    from_slot: jax.Array  # [T] int32: read the token from last_tokens[slot] (sampled by the step in flight), or -1
    positions: jax.Array  # [T] int32
    slot_mapping: jax.Array  # [T] int32, -1 for padding tokens
    query_start_loc: jax.Array  # [R + 1] int32
    seq_lens: jax.Array  # [R] int32
    page_table: jax.Array  # [R, max_pages] int32
    num_seqs: jax.Array  # [] int32
    logits_indices: jax.Array  # [R] int32: each request's last scheduled token
    slots: jax.Array  # [R] int32: penalty-state row of each request (scratch row for padding)
    sample_mask: jax.Array  # [R] bool: the row's token is a real next token (not a mid-prompt chunk)
    temperature: jax.Array  # [R] f32
    top_k: jax.Array  # [R] int32
    top_p: jax.Array  # [R] f32
    min_p: jax.Array  # [R] f32
    repetition_penalty: jax.Array  # [R] f32
    presence_penalty: jax.Array  # [R] f32
    frequency_penalty: jax.Array  # [R] f32
    seeds: jax.Array  # [R] uint32
    step: jax.Array  # [R] int32: tokens generated so far (with the seed, the row's random key)
    suppress_eos: jax.Array  # [R] bool
    eos_ids: jax.Array  # [R, NUM_BANNED] int32, -1 padded
    lora_slots: jax.Array  # [T] int32: each token's LoRA adapter slot, -1 = the base model (and padding)

    # The step's inputs cross to the device as ONE int32 buffer: each separately passed host array is its own
    # argument and host-to-device copy, and one buffer instead of 23 cut the host's dispatch of a batch-1 8B step
    # from 2.3 to 1.2 ms on the H200.
    def layout(self) -> tuple:
        """Static (name, shape, dtype) of every field: with the packed buffer, all `unpack` needs."""
        return tuple((f.name, np.shape(getattr(self, f.name)), np.dtype(getattr(self, f.name).dtype).name)
                     for f in dataclasses.fields(self))

    def pack(self) -> np.ndarray:
        """Host fields -> one int32 [n] buffer (f32 / uint32 bit patterns as they are, bools as 0/1). Every field
        starts at a multiple of 256 bytes: XLA hands slices of the buffer to kernels as they are, and the Mosaic GPU
        kernels (TMA) require 256-byte-aligned operands."""
        parts = []
        for f in dataclasses.fields(self):
            a = np.asarray(getattr(self, f.name))
            a = (a.astype(np.int32) if a.dtype == np.bool_ else a.view(np.int32)).ravel()
            parts += [a, np.zeros(-a.size % _ALIGN, np.int32)]
        return np.concatenate(parts)

    @classmethod
    def unpack(cls, packed: jax.Array, layout: tuple) -> "StepInputs":
        """The inverse of `pack`, traced inside the step (slices and bitcasts, no copies of note)."""
        fields, offset = {}, 0
        for name, shape, dtype in layout:
            size = math.prod(shape)
            a = packed[offset: offset + size].reshape(shape)
            offset += size + -size % _ALIGN
            if dtype == "bool":
                a = a != 0
            elif dtype != "int32":
                a = jax.lax.bitcast_convert_type(a, jnp.dtype(dtype))
            fields[name] = a
        return cls(**fields)


@dataclasses.dataclass
class SlotState:
    """Host-side state of each slot, kept while its request runs, so that a step gathers rows by slot with numpy
    instead of reading every request's parameters again: the sampling parameters (set when the request is seated),
    and the page table row (extended as the request's pages grow; zero beyond them, as the step expects)."""
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    repetition_penalty: np.ndarray
    presence_penalty: np.ndarray
    frequency_penalty: np.ndarray
    seeds: np.ndarray
    min_tokens: np.ndarray
    eos_ids: np.ndarray  # [S, NUM_BANNED]: the ids banned while min_tokens is not reached, -1 padded
    page_table: np.ndarray  # [S, max_pages]
    num_pages: list[int]  # pages written into each page_table row
    lora_slot: np.ndarray  # [S]: the adapter slot of the request (engine/lora.py), -1 for none

    @classmethod
    def empty(cls, num_slots: int, max_pages: int) -> "SlotState":
        f32, i32 = (lambda fill=0.0: np.full(num_slots, fill, np.float32)), (lambda: np.zeros(num_slots, np.int32))
        return cls(temperature=f32(), top_k=i32(), top_p=f32(1.0), min_p=f32(), repetition_penalty=f32(1.0),
                   presence_penalty=f32(), frequency_penalty=f32(), seeds=np.zeros(num_slots, np.uint32),
                   min_tokens=i32(), eos_ids=np.full((num_slots, NUM_BANNED), -1, np.int32),
                   page_table=np.zeros((num_slots, max_pages), np.int32), num_pages=[0] * num_slots,
                   lora_slot=np.full(num_slots, -1, np.int32))
