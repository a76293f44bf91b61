"""Engine configuration (vLLM's names and meanings), validated once."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from engine.speculative import SpeculativeConfig


def default_buckets(limit: int, smallest: int = 1) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `limit`, with `limit` itself last."""
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)


def pow2_bucket(n: int, smallest: int) -> int:
    """The power of two at or above n, at least `smallest`: the padded lengths of the compiled-on-first-use dense
    forwards (prompt scoring, embeddings)."""
    return max(smallest, 1 << (n - 1).bit_length())


KV_CACHE_DTYPES = ("auto", "bf16", "fp8", "fp8_e4m3")
POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclasses.dataclass(frozen=True)
class PoolerConfig:
    """vLLM's --pooler-config: {"pooling_type": "LAST" | "MEAN" | "CLS", "normalize": true}."""
    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self):
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type={self.pooling_type!r} must be one of {', '.join(POOLING_TYPES)}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize={self.normalize!r} must be true or false")

    @classmethod
    def parse(cls, value) -> PoolerConfig:
        """None (the defaults), a PoolerConfig, a dict or its JSON text; pooling_type in any case."""
        if value is None or isinstance(value, cls):
            return value or cls()
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError(f"the pooler config must be a JSON object, got {value!r}")
        unknown = sorted(set(value) - {"pooling_type", "normalize"})
        if unknown:
            raise ValueError(f"unknown pooler config keys {unknown}: it takes pooling_type and normalize")
        value = dict(value)
        if isinstance(value.get("pooling_type"), str):
            value["pooling_type"] = value["pooling_type"].upper()
        return cls(**value)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 2048  # prompt + output tokens per request
    max_num_seqs: int = 64  # requests in one step
    max_num_batched_tokens: int = 2048  # the per-step token budget shared by decodes and prompt chunks
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pages; None = sized from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # fraction of device memory for weights + KV cache
    enable_prefix_caching: bool = True
    calculate_kv_scales: bool = False  # fp8 cache without checkpoint scales: calibrate them at start-up
    token_buckets: tuple[int, ...] | None = None  # padded T sizes compiled at start-up; None = powers of two
    seed: int = 0
    max_queue: int | None = None  # waiting requests beyond this are refused (server: 503)
    compilation_cache_dir: str | None = None
    max_logprobs: int = 20
    kv_cache_dtype: str = "auto"  # vLLM's --kv-cache-dtype: "auto"/"bf16" = the weights' dtype; "fp8"/"fp8_e4m3"
    # Run the decoder layers as straight-line code over per-layer weight arrays instead of a device loop over the
    # stacked ones. A loop pays a launch round trip per layer, which at decode sizes costs more than the layers'
    # own kernels (batch-1 decode of an 8B model on the H200: 15.3 ms -> 6.0 ms per step). With per-layer arrays
    # every layer's kernels are identical, so compilation stays close to the loop's (9 s vs 45 s per bucket when
    # the layers are slices of the stacked weights). False keeps the loop (fastest start-up).
    unroll_layers: bool = True
    # Decode-only steps (every request one token) get their own executables whose attention runs the decode
    # kernel (engine/runner.py, DECODE). None: where the paged-attention kernel runs (a Hopper GPU).
    decode_steps: bool | None = None
    # LoRA adapters (engine/lora.py), vLLM's flags: requests may name a PEFT adapter; up to max_loras different
    # ones run in a step, each of rank <= max_lora_rank
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    # Speculative decoding by prompt lookup (engine/speculative.py), vLLM's --speculative-config: a dict / JSON
    # text / SpeculativeConfig; None (the default) decodes one token a step
    speculative_config: Any = None
    # Embeddings (engine/pooling.py), vLLM's --pooler-config: a dict / JSON text / PoolerConfig; None: LAST, normalized
    pooler_config: Any = None

    def __post_init__(self):
        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        object.__setattr__(self, "pooler_config", PoolerConfig.parse(self.pooler_config))
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.page_size & (self.page_size - 1) or self.page_size > 256:
            raise ValueError(f"page_size={self.page_size} must be a power of two <= 256 (the GPU kernel: 16-64)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.num_pages is not None and self.num_pages < self.max_pages_per_seq:
            raise ValueError(f"num_pages={self.num_pages} cannot hold one request of max_model_len="
                             f"{self.max_model_len} ({self.max_pages_per_seq} pages of {self.page_size})")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs} (every running request needs a token per step)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} must be one of {KV_CACHE_DTYPES}")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras={self.max_loras} and max_lora_rank={self.max_lora_rank} must be >= 1")
        if self.token_buckets is not None and max(self.token_buckets) < self.max_num_batched_tokens:
            raise ValueError(f"token_buckets={self.token_buckets}: the largest must reach max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}")

    @property
    def fp8_kv_cache(self) -> bool:
        """The KV cache holds float8_e4m3fn values with per-(layer, kv-head) scales."""
        return self.kv_cache_dtype in ("fp8", "fp8_e4m3")

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        """(tokens T, requests R) shapes compiled at start-up. A step of t tokens and r requests runs in the
        smallest bucket with T >= t; R = min(T, max_num_seqs) always holds r, since r <= t."""
        # The smallest default bucket stays 8 even for max_num_seqs < 8: at T = 1 XLA lowers the split-K
        # projections as transposes and reductions instead of GEMMs (H200, 8B batch 1: 9.4 ms a step vs 4.3).
        tokens = self.token_buckets or default_buckets(self.max_num_batched_tokens, 8)
        return tuple((t, min(t, self.max_num_seqs)) for t in sorted(set(tokens)))


# XLA's dot merger joins GEMMs that share an input (q/k/v, gate/up) into one GEMM over concatenated weights. The
# weights are step arguments, not constants, so the concatenation runs every step: at 256 decode rows on the H200 a
# 25 µs weight copy per layer, and the merged GEMM was no faster than the separate ones (0.6 ms of a 13 ms step).
STEP_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}


def parse_xla_options(text: str) -> dict[str, bool | int | float | str]:
    """"name=value,name=value" (XLA DebugOptions fields, as XLA_FLAGS spells them without the dashes) -> a dict
    for `compiler_options`; true/false become bools and numbers numbers."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("xla_"):
            raise ValueError(f"XLA option {item!r} must read xla_<name>=<value>")
        options[name] = _option_value(value)
    return options


def _option_value(value: str) -> bool | int | float | str:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# fp8 weights: XLA's Triton GEMMs off, so its fp8 dots go to cuBLASLt alone. Autotuning Triton's fp8 tilings took
# 21.7 s for one gate_up dot at 1,024 rows on an H100 (0.56 s without: `scripts/bench_compile.py`), 10-30 s a step
# bucket, for no gain: 261.9 vs 264.7 µs there, and o's dot ran faster without (68.9 vs 72.5 µs).
FP8_WEIGHT_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def step_compiler_options(extra: str | None = None, *, fp8_weights: bool = False) -> dict:
    """The step's XLA options: STEP_COMPILER_OPTIONS (and FP8_WEIGHT_COMPILER_OPTIONS for a model with fp8 weights),
    then IE_JAX_XLA_OPTIONS from the environment, then `extra` (both "name=value,..."; later ones win). Unlike
    XLA_FLAGS they apply to the step alone, not to every computation of the process."""
    return {**STEP_COMPILER_OPTIONS, **(FP8_WEIGHT_COMPILER_OPTIONS if fp8_weights else {}),
            **parse_xla_options(os.environ.get("IE_JAX_XLA_OPTIONS", "")), **parse_xla_options(extra or "")}
