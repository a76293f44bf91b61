"""Model configuration: one frozen dataclass for every supported family, read from HF `config.json` or a preset.

Families map onto two implementations:
  llama  Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3 (flags: GQA, qkv bias, q/k norm, rope scaling, window, tying)
  gpt2   GPT-2 (learned positions, LayerNorm, GELU, fused qkv)
A checkpoint's weight format rides along as `ModelConfig.quantization` (a `QuantConfig`, read from HF
`quantization_config`). This module knows nothing about arrays or weights; it only describes shapes and options,
and refuses options it cannot honour rather than silently computing something else.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = LLAMA_TYPES + ("gpt2",)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
QUANT_METHODS = ("int8", "awq", "gptq", "fp8")
QUANT_BITS = {"int8": 8, "awq": 4, "gptq": 4, "fp8": 8}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 and yarn (yarn: the model's max_position_embeddings)
    beta_fast: float = 32.0  # yarn: the ramp between extrapolated and interpolated frequencies, in rotations
    beta_slow: float = 1.0
    truncate: bool = True  # yarn: the ramp's ends rounded to whole dimensions
    attention_factor: float | None = None  # yarn: cos and sin scale (None: from factor, mscale, mscale_all_dim)
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor={self.factor} must be > 0")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the attention/MLP projections are stored (embeddings, norms and lm_head stay in the model dtype).

      int8  W8A16: `weight` int8 [out, in] + `weight_scale` f32 [out], symmetric per output channel. Our own format:
            config `{"quant_method": "int8", "bits": 8}`.
      awq   W4A16, AutoAWQ "GEMM" checkpoints: asymmetric groups of `group_size` input rows.
      gptq  W4A16, GPTQ (AutoGPTQ v1 "gptq" checkpoint format: zeros stored minus one); `desc_act` = act-order.
      fp8   W8A8: e4m3 weights, per-output-channel (or per-tensor) scales; activations scaled per token
            (`activation_scheme="dynamic"`) or by a calibrated `input_scale` ("static").
    """
    method: str
    bits: int
    group_size: int | None = None  # awq/gptq: rows per group; -1 (gptq) = one group over all rows
    desc_act: bool = False  # gptq: rows are grouped by a permutation (g_idx) rather than contiguously
    sym: bool = False  # gptq: informational (zeros are stored either way)
    activation_scheme: str = "dynamic"  # fp8

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quantization method={self.method!r} is not supported; expected one of {QUANT_METHODS}")
        if self.bits != QUANT_BITS[self.method]:
            raise ValueError(f"bits={self.bits} is not supported for {self.method}; expected {QUANT_BITS[self.method]}")
        if self.method in ("awq", "gptq"):
            ok = self.group_size is not None and (self.group_size > 0 or (self.method == "gptq" and
                                                                          self.group_size == -1))
            if not ok:
                raise ValueError(f"group_size={self.group_size} must be a positive number of rows (or -1 for gptq)")
        elif self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} has no meaning for {self.method}; leave it None")
        if self.desc_act and self.method != "gptq":
            raise ValueError(f"desc_act=True is a gptq option, not {self.method}")
        if self.activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"activation_scheme={self.activation_scheme!r} must be 'dynamic' or 'static'")
        if self.activation_scheme == "static" and self.method != "fp8":
            raise ValueError(f"activation_scheme='static' is an fp8 option, not {self.method}")

    @classmethod
    def from_hf(cls, q: dict[str, Any]) -> "QuantConfig":
        """Parse an HF `quantization_config` dict; options that would change the layout raise ValueError."""
        method = q.get("quant_method")
        if method == "awq":
            version = str(q.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(f"AWQ version={version!r} is not supported; only 'gemm' checkpoints load")
            if not q.get("zero_point", True):
                raise ValueError(f"AWQ zero_point={q['zero_point']!r} is not supported; expected true")
            _refuse_modules(q)
            return cls("awq", int(q.get("bits", q.get("w_bit", 4))), int(q.get("group_size", q.get("q_group_size",
                                                                                                  128))))
        if method == "gptq":
            fmt = q.get("checkpoint_format", "gptq")
            if fmt != "gptq":
                raise ValueError(f"GPTQ checkpoint_format={fmt!r} is not supported; expected 'gptq'")
            for key in ("use_exllama", "exllama_config"):
                if isinstance(q.get(key), dict) and q[key].get("version", 1) != 1:
                    raise ValueError(f"GPTQ {key}={q[key]!r}: exllama v2 layouts are not supported")
            if q.get("static_groups"):
                raise ValueError(f"GPTQ static_groups={q['static_groups']!r} is not supported")
            _refuse_modules(q)
            return cls("gptq", int(q.get("bits", 4)), int(q.get("group_size", 128)), bool(q.get("desc_act", False)),
                       bool(q.get("sym", True)))
        if method == "fp8":
            if q.get("weight_block_size"):
                raise ValueError(f"FP8 weight_block_size={q['weight_block_size']!r} is not supported; expected "
                                 f"per-tensor or per-channel weight scales")
            _refuse_modules(q, allowed=("lm_head",))
            return cls("fp8", 8, activation_scheme=q.get("activation_scheme", "dynamic"))
        if method == "int8":
            return cls("int8", int(q.get("bits", 8)))
        raise ValueError(f"quantization_config quant_method={method!r} is not supported; expected one of "
                         f"{QUANT_METHODS}")

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` dict a checkpoint of this format carries."""
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "version": "gemm",
                    "zero_point": True}
        if self.method == "gptq":
            return {"quant_method": "gptq", "bits": 4, "group_size": self.group_size, "desc_act": self.desc_act,
                    "sym": self.sym, "checkpoint_format": "gptq"}
        if self.method == "fp8":
            return {"quant_method": "fp8", "activation_scheme": self.activation_scheme}
        return {"quant_method": "int8", "bits": 8}


def _refuse_modules(q: dict, allowed: tuple[str, ...] = ()) -> None:
    """Layers left unquantized other than the ones we never quantize would need a per-module format."""
    for key in ("modules_to_not_convert", "ignored_layers"):
        extra = [m for m in (q.get(key) or ()) if m not in allowed]
        if extra:
            raise ValueError(f"quantization_config {key}={extra!r} is not supported: every attention/MLP "
                             f"projection must be quantized")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    quantization: QuantConfig | None = None  # None: every weight is in the model dtype

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")
        acts = ("gelu_new", "gelu_pytorch_tanh", "gelu") if self.is_gpt2 else ("silu",)
        if self.hidden_act not in acts:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported for {self.model_type}; expected {acts}")
        if self.quantization is not None and self.is_gpt2:
            raise ValueError(f"quantization={self.quantization.method!r} is not supported for gpt2; quantized "
                             f"weights are implemented for the llama family")

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        D, F, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.is_gpt2:
            layer = D * (q + 2 * kv) + (q + 2 * kv) + q * D + D + 2 * D * F + F + D + 4 * D
            return V * D + self.max_position_embeddings * D + L * layer + 2 * D
        layer = D * (q + 2 * kv) + q * D + 3 * D * F + 2 * D
        layer += (q + 2 * kv) * self.qkv_bias + D * self.o_bias + (2 * F + D) * self.mlp_bias
        layer += 2 * self.head_dim * self.qk_norm
        return V * D * (1 if self.tie_word_embeddings else 2) + L * layer + D

    # -------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: str | os.PathLike | dict[str, Any]) -> "ModelConfig":
        """Build from an HF `config.json` (a path, a directory holding one, or the parsed dict)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        c = dict(config)
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} (architectures={c.get('architectures')}) is not supported; "
                             f"expected one of {SUPPORTED_MODEL_TYPES}")
        eos = c.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        quant = QuantConfig.from_hf(c["quantization_config"]) if c.get("quantization_config") else None
        if model_type == "gpt2":
            if quant is not None:
                raise ValueError(f"quantization_config quant_method={quant.method!r} is not supported for gpt2")
            D, N = c["n_embd"], c["n_head"]
            return cls(model_type="gpt2", vocab_size=c["vocab_size"], hidden_size=D, num_layers=c["n_layer"],
                       num_heads=N, num_kv_heads=N, head_dim=D // N, intermediate_size=c.get("n_inner") or 4 * D,
                       max_position_embeddings=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                       tie_word_embeddings=c.get("tie_word_embeddings", True), qkv_bias=True, o_bias=True,
                       mlp_bias=True, hidden_act=c.get("activation_function", "gelu_new"),
                       bos_token_id=c.get("bos_token_id"), eos_token_id=eos)
        _refuse(c, "hidden_act", lambda v: v == "silu")
        _refuse(c, "pretraining_tp", lambda v: v in (None, 1))
        if model_type == "qwen2" or model_type == "qwen3":
            _refuse(c, "use_sliding_window", lambda v: not v)
        layer_types = c.get("layer_types")
        if layer_types and len(set(layer_types)) > 1:
            raise ValueError(f"layer_types={sorted(set(layer_types))}: mixed attention types are not supported")
        window = c.get("sliding_window") if model_type == "mistral" else None
        D, N = c["hidden_size"], c["num_attention_heads"]
        qkv_bias = {"qwen2": True}.get(model_type, c.get("attention_bias", False))
        o_bias = c.get("attention_bias", False) if model_type in ("llama", "qwen3") else False
        return cls(model_type=model_type, vocab_size=c["vocab_size"], hidden_size=D,
                   num_layers=c["num_hidden_layers"], num_heads=N,
                   num_kv_heads=c.get("num_key_value_heads") or N, head_dim=c.get("head_dim") or D // N,
                   intermediate_size=c["intermediate_size"],
                   max_position_embeddings=c.get("max_position_embeddings", 4096),
                   norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(_rope_theta(c)),
                   rope_scaling=_rope_scaling(c), tie_word_embeddings=c.get("tie_word_embeddings", False),
                   qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=c.get("mlp_bias", False),
                   qk_norm=model_type == "qwen3", sliding_window=window, bos_token_id=c.get("bos_token_id"),
                   eos_token_id=eos, quantization=quant)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this config (what `save_pretrained` writes)."""
        eos = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        eos = eos if self.eos_token_id else None
        if self.is_gpt2:
            return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": self.vocab_size,
                    "n_embd": self.hidden_size, "n_layer": self.num_layers, "n_head": self.num_heads,
                    "n_inner": self.intermediate_size, "n_positions": self.max_position_embeddings,
                    "layer_norm_epsilon": self.norm_eps, "activation_function": self.hidden_act,
                    "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
                    "eos_token_id": eos}
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        out = {"architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
               "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
               "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
               "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
               "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.norm_eps,
               "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
               "hidden_act": self.hidden_act, "bos_token_id": self.bos_token_id, "eos_token_id": eos}
        if self.rope_scaling is not None:
            out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if self.model_type == "llama":
            out.update(attention_bias=self.o_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "qwen3":
            out.update(attention_bias=self.o_bias)
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.quantization is not None:
            out["quantization_config"] = self.quantization.to_hf()
        return out


def _refuse(c: dict, key: str, ok) -> None:
    if key in c and not ok(c[key]):
        raise ValueError(f"config option {key}={c[key]!r} is not supported for model_type={c.get('model_type')!r}")


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or {}
    return c.get("rope_theta") or params.get("rope_theta") or 10000.0


def _rope_scaling(c: dict) -> RopeScaling | None:
    rs = c.get("rope_scaling") or c.get("rope_parameters")
    if not rs:
        return None
    rope_type = rs.get("rope_type") or rs.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    if rope_type == "default":
        return None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
            "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")
    given = {k: rs[k] for k in keys if rs.get(k) is not None}
    if rope_type == "yarn":  # HF's defaults: the model's own length; factor from the two lengths
        given.setdefault("original_max_position_embeddings", c.get("max_position_embeddings", 8192))
        given.setdefault("factor", c.get("max_position_embeddings", 8192) / given["original_max_position_embeddings"])
    return RopeScaling(rope_type=rope_type, **given)
