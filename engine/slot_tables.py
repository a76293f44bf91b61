"""The per-slot sampling rows a step reads but never writes, on the device: the prompt mask (repetition penalty),
the logit bias (sparse: token ids and values) and the guided-decoding mask (a bitmask of the allowed tokens). A
row is written when its slot is seated by a request that needs it, and cleared when the next holder does not; a
guided request's mask row is rewritten whenever its grammar state moves."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from engine.request import Request
from ie_jax.sampling import MAX_LOGIT_BIAS

ALL_ALLOWED = np.uint32(0xFFFFFFFF)


class SlotTables:
    def __init__(self, num_slots: int, vocab_size: int, device):
        S, V = num_slots, vocab_size
        self.words = -(-V // 32)
        # (prompt mask [S, V] bool, bias ids [S, NB] int32 (-1 padded), bias values [S, NB] f32,
        #  allowed tokens [S, ceil(V / 32)] uint32), as the step takes them
        self.arrays = jax.device_put((jnp.zeros((S, V), bool), jnp.full((S, MAX_LOGIT_BIAS), -1, jnp.int32),
                                      jnp.zeros((S, MAX_LOGIT_BIAS), jnp.float32),
                                      jnp.full((S, self.words), ALL_ALLOWED, jnp.uint32)), device)
        self.biased: set[int] = set()  # slots whose bias rows are not empty
        self.guided: dict[int, tuple[int, int]] = {}  # slot -> (guide, state) its mask row holds
        self._set_row = jax.jit(lambda a, i, row: a.at[i].set(row), donate_argnums=0)

    def _write(self, which: int, slot: int, row) -> None:
        arrays = list(self.arrays)
        arrays[which] = self._set_row(arrays[which], slot, row)
        self.arrays = tuple(arrays)

    def set_prompt_mask(self, slot: int, mask: np.ndarray) -> None:
        self._write(0, slot, mask)

    def seat(self, slot: int, request: Request) -> None:
        """A request takes `slot`: its logit bias and guide mask, or cleared rows where the last holder had some."""
        p = request.sampling_params
        if p.biased or slot in self.biased:
            ids, values = np.full(MAX_LOGIT_BIAS, -1, np.int32), np.zeros(MAX_LOGIT_BIAS, np.float32)
            for j, (token, bias) in enumerate(p.logit_bias or ()):
                ids[j], values[j] = token, bias
            self._write(1, slot, ids)
            self._write(2, slot, values)
            if p.biased:
                self.biased.add(slot)
            else:
                self.biased.discard(slot)
        if request.guide is None and self.guided.pop(slot, None) is not None:
            self._write(3, slot, np.full(self.words, ALL_ALLOWED, np.uint32))
        self.update_guide(slot, request)

    def update_guide(self, slot: int, request: Request) -> None:
        """Rewrite a guided request's mask row if its state moved since the row was written."""
        if request.guide is None:
            return
        key = (request.guide.serial, request.guide_state)
        if self.guided.get(slot) != key:
            self._write(3, slot, request.guide.mask(request.guide_state))
            self.guided[slot] = key
