"""Quantized projections in HF-style checkpoints: each method's tensors per module, the one repack between them and
our Linear variables, and `save_quantized`.

One projection `<module>` (e.g. model.layers.3.self_attn.q_proj) is stored per method as:
  int8  <module>.weight int8 [out, in], <module>.weight_scale f32 [out]              (our format, W8A16)
  awq   <module>.qweight int32 [in, out/8], .qzeros int32 [in/G, out/8], .scales f16 [in/G, out]   (AutoAWQ GEMM)
  gptq  <module>.qweight int32 [in/8, out], .qzeros int32 [in/G, out/8], .scales f16 [in/G, out],
        .g_idx int32 [in] (optional when groups are contiguous)                                      (GPTQ v1)
  fp8   <module>.weight e4m3 [out, in], .weight_scale f32 (scalar, [out] or [out, 1]), .input_scale f32 scalar
        (only with activation_scheme "static")                                                      (HF FP8)
plus an optional dense `<module>.bias`. The bit layouts are described in int4.py and fp8.py. `repack` turns one
layer's tensors into the arrays our Linear holds (linear.py: the decode kernel's packed layout, K-major q
[out, in]); `export` is its inverse, so save -> load gives identical arrays. This is the one place a checkpoint's
packing becomes the kernel's: AWQ / GPTQ int32 words are unpacked to 4-bit values and packed again as int4 [out, in]
(the value minus 8, two per byte) with the scales and zero points kept as they are. int8's and fp8's `weight`
[out, in] is already our q [N, K], byte for byte: it is neither transposed nor copied into a new layout.

weights.py drives loading and saving with its name table; this module knows the per-module formats, not the
model's names.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ie_jax.config import QuantConfig
from ie_jax.quant.fp8 import Fp8Weights, from_hf_fp8, to_hf_fp8
from ie_jax.quant.int4 import awq_pack, awq_unpack, gptq_pack, gptq_unpack
from kernels_pallas.quant_matmul import PackedInt4, pack_int4, unpack_int4

# The HF tensor suffixes of one quantized module, per method: (required, optional).
MODULE_TENSORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "int8": (("weight", "weight_scale"), ()),
    "awq": (("qweight", "qzeros", "scales"), ()),
    "gptq": (("qweight", "qzeros", "scales"), ("g_idx",)),
    "fp8": (("weight", "weight_scale"), ("input_scale",)),
}


def module_tensors(quant: QuantConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor suffixes of one quantized module under `quant`."""
    required, optional = MODULE_TENSORS[quant.method]
    if quant.method == "fp8" and quant.activation_scheme == "static":
        return required + ("input_scale",), ()
    return required, optional


def adjust_config(quant: QuantConfig, tensor_names) -> QuantConfig:
    """An FP8 checkpoint that carries `input_scale` tensors uses them, whatever its activation_scheme says."""
    if quant.method == "fp8" and quant.activation_scheme == "dynamic" and any(
            n.endswith(".input_scale") for n in tensor_names):
        return dataclasses.replace(quant, activation_scheme="static")
    return quant


def _group_size(quant: QuantConfig, K: int) -> int:
    return K if quant.group_size == -1 else quant.group_size


def matrix_shape(quant: QuantConfig, q_shape: tuple[int, ...]) -> tuple[int, int]:
    """(K = in, N = out) of one projection from the shape of the `q` our Linear holds: [..., N, K] (K-major) in
    every method."""
    del quant  # every method holds q K-major
    *_, n, k = q_shape
    return k, n


def hf_shapes(quant: QuantConfig, K: int, N: int) -> dict[str, tuple[int, ...] | None]:
    """Expected shape of each tensor of one layer's module with in=K, out=N (None: checked by `repack`)."""
    if quant.method == "int8":
        return {"weight": (N, K), "weight_scale": (N,)}
    if quant.method == "fp8":
        return {"weight": (N, K), "weight_scale": None, "input_scale": None}
    G = _group_size(quant, K)
    if quant.method == "awq":
        return {"qweight": (K, N // 8), "qzeros": (K // G, N // 8), "scales": (K // G, N)}
    return {"qweight": (K // 8, N), "qzeros": (K // G, N // 8), "scales": (K // G, N), "g_idx": (K,)}


def repack(quant: QuantConfig, tensors: dict[str, np.ndarray], K: int, N: int) -> dict[str, np.ndarray]:
    """One layer's HF tensors of a module -> {variable name: array} of our quantized Linear (see linear.py)."""
    if quant.method == "int8":
        weight = np.asarray(tensors["weight"])
        if weight.dtype != np.int8:
            raise ValueError(f"int8 weight has dtype {weight.dtype}; expected int8")
        return {"q": weight, "scale": np.asarray(tensors["weight_scale"], np.float32)}  # [out, in] as stored
    if quant.method == "fp8":
        qw = from_hf_fp8(tensors["weight"], tensors["weight_scale"], tensors.get("input_scale"))
        out = {"q": qw.q, "scale": qw.scale}
        if quant.activation_scheme == "static":
            out["input_scale"] = qw.input_scale
        return out
    if quant.method == "awq":
        qw = awq_unpack(tensors["qweight"], tensors["qzeros"], tensors["scales"], _group_size(quant, K))
    else:
        qw = gptq_unpack(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"))
        if qw.perm is not None and not quant.desc_act:
            raise ValueError("g_idx permutes the rows (act-order) but the config says desc_act=false")
    packed = pack_int4(qw)
    out = {"q": np.asarray(packed.q), "scales": np.asarray(packed.scales), "zeros": np.asarray(packed.zeros)}
    if quant.desc_act:
        out["perm"] = np.arange(K, dtype=np.int32) if qw.perm is None else np.asarray(qw.perm)
    return out


def export(quant: QuantConfig, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `repack`: one layer's Linear variables -> {HF tensor suffix: array}."""
    if quant.method == "int8":
        return {"weight": np.asarray(arrays["q"]), "weight_scale": np.asarray(arrays["scale"], np.float32)}
    if quant.method == "fp8":
        return to_hf_fp8(Fp8Weights(arrays["q"], arrays["scale"], arrays.get("input_scale")))
    K = arrays["q"].shape[-1]  # q [N, K] int4
    perm = arrays.get("perm")
    if perm is not None and np.array_equal(perm, np.arange(K)):
        perm = None
    qw = unpack_int4(PackedInt4(arrays["q"], arrays["scales"], arrays["zeros"], K // arrays["scales"].shape[-2],
                                perm))
    packed = awq_pack(qw) if quant.method == "awq" else gptq_pack(qw)
    return {k: np.asarray(v) for k, v in packed.items()}


def save_quantized(model, path, *, max_shard_bytes: int = 5 * 2**30, generation_config: dict | None = None) -> Path:
    """Write a quantized model as an HF-style checkpoint in its method's format (config.json carries
    `quantization_config`); `ie_jax.load_model(path)` reads it back to identical arrays."""
    from ie_jax.weights import save_hf_checkpoint  # weights.py imports this module
    if model.config.quantization is None:
        raise ValueError("the model is not quantized; use ie_jax.weights.save_hf_checkpoint, or quantize_model first")
    return save_hf_checkpoint(model, model.config, path, max_shard_bytes=max_shard_bytes,
                              generation_config=generation_config)
