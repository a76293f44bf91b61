"""Quantization formats in plain jnp (the references for the kernels and for QLoRA's frozen base), the quantized
Linear layers built from them, and `quantize_model`.

    int8.py  W8A16, per-output-channel symmetric          int4.py  W4A16 groups; AWQ GEMM / GPTQ (un)packing
    fp8.py   W8A8 e4m3, per-token activation scales       nf4.py   NF4 + double quantization (QLoRA)
    linear.py  Int8Linear / Int4Linear / Fp8Linear, quantize_model    checkpoint.py  HF-style files in each format
"""
from ie_jax.quant.fp8 import Fp8Weights, dequantize_fp8, fp8_matmul_reference, quantize_fp8
from ie_jax.quant.int4 import (Int4Weights, awq_pack, awq_unpack, dequantize_int4, gptq_pack, gptq_unpack,
                               int4_matmul_reference, quantize_int4)
from ie_jax.quant.int8 import Int8Weights, dequantize_int8, int8_matmul_reference, quantize_int8
from ie_jax.quant.linear import (Fp8Linear, Int4Linear, Int8Linear, QuantData, QuantLinear, convert_linears,
                                 quant_config, quantize_model)
from ie_jax.quant.nf4 import NF4_LEVELS, NF4Array, dequantize_nf4, max_abs_error, nf4_bytes, quantize_nf4

__all__ = ["Fp8Linear", "Fp8Weights", "Int4Linear", "Int4Weights", "Int8Linear", "Int8Weights", "NF4_LEVELS",
           "NF4Array", "QuantData", "QuantLinear", "awq_pack", "awq_unpack", "convert_linears", "dequantize_fp8",
           "dequantize_int4", "dequantize_int8", "dequantize_nf4", "fp8_matmul_reference", "gptq_pack",
           "gptq_unpack", "int4_matmul_reference", "int8_matmul_reference", "max_abs_error", "nf4_bytes",
           "quant_config", "quantize_fp8", "quantize_int4", "quantize_int8", "quantize_model", "quantize_nf4"]
