"""Quantization formats in plain jnp: the references for kernels and for QLoRA's frozen base."""
from ie_jax.quant.nf4 import NF4_LEVELS, NF4Array, dequantize_nf4, max_abs_error, nf4_bytes, quantize_nf4

__all__ = ["NF4_LEVELS", "NF4Array", "dequantize_nf4", "max_abs_error", "nf4_bytes", "quantize_nf4"]
