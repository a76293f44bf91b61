"""AWQ calibration (activation-aware weight quantization, Lin et al., 2023) for the Llama family.

A few input channels of every Linear carry activations far larger than the rest. Rounding errors in the weight
rows that meet those channels are amplified by them. AWQ scales such rows up by s > 1 before int4 rounding and
divides the activations by s, so the layer computes the same function in float with a smaller rounding error:

    y = x @ W = (x / s) @ (s * W)    s [C] per input channel, applied to the rows of W [C, O]

  1. Calibration forward. The stacked layers run one at a time in Python, each layer through its own modules
     (its slice of the stacked variables), with the Linears' inputs recorded. Per input channel we keep the mean
     |activation| and a strided subset of the tokens, on which output errors are measured.
  2. Scale search, per group of Linears that share an input (q/k/v, gate/up, o, down): for alpha on a grid in
     [0, 1], s = mag**alpha (normalised so that max(s) * min(s) = 1), and the error is
     mean((x / s) @ Q(s * W) - x @ W)**2 with Q the int4 round-to-nearest group quantizer of ie_jax/quant/int4.py.
     alpha = 0 is s = 1, plain RTN, so the chosen scale is never worse than RTN on the calibration tokens.
  3. Folding. 1/s moves into the op before the Linears: the RMSNorm weight (q/k/v, gate/up), the output columns
     of v_proj (o_proj) and of up_proj (down_proj); s multiplies the Linears' rows. In float the model is
     unchanged. With grouped-query attention, o_proj's input channel (n, h) of q-head n comes from kv head
     n // G, so its scale is searched on magnitudes averaged over the G q-heads of a kv head and expanded back:
     the per-kv-head scale is what v_proj can absorb.

The result is still a float model; `ie_jax.quant.quantize_model(model, "awq")` turns it into int4 afterwards. This
module knows the Llama layer layout and nothing about packing or checkpoints. It does not search clipping ranges
(AutoAWQ's second pass) and does not support GPT-2 (its fused c_attn and LayerNorm would need their own folds).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ie_jax.models.context import DenseCausal
from ie_jax.models.layers import Linear
from ie_jax.quant.int4 import dequantize_int4, quantize_int4

GROUPS = ("qkv", "o", "gate_up", "down")  # Linears that share an input, in layer order
_GROUP_LINEARS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                  "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    group_size: int = 128  # input channels per quantization group (as the int4 format stores them)
    num_grid: int = 20  # alphas searched, evenly spaced in [0, 1]
    max_search_tokens: int = 4096  # calibration tokens (a strided subset) on which output errors are measured
    batch_size: int = 8  # calibration rows per layer forward
    scale_o_proj: bool = True  # fold o_proj's scale into v_proj (per kv head under GQA)

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1")
        if self.num_grid < 1:
            raise ValueError(f"num_grid={self.num_grid} must be >= 1")
        if self.max_search_tokens < 1:
            raise ValueError(f"max_search_tokens={self.max_search_tokens} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


@dataclasses.dataclass(frozen=True)
class AWQScales:
    """The searched scales of every layer: group name -> s [L, C] (C = the group's input width), or None when the
    group is not scaled; alphas: group name -> chosen alpha [L]; errors: group name -> [L, 2] (RTN, AWQ) output
    mean squared error on the calibration tokens."""
    scales: dict[str, np.ndarray | None]
    alphas: dict[str, np.ndarray]
    errors: dict[str, np.ndarray]

    def summary(self) -> str:
        lines = []
        for g, err in self.errors.items():
            ratio = err[:, 1].sum() / max(err[:, 0].sum(), 1e-30)
            lines.append(f"{g:8s} alpha mean {self.alphas[g].mean():.2f}  output error AWQ/RTN {ratio:.3f}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The quantizer and the scale search


def fake_quantize_int4(w, group_size: int):
    """w [C, O] through the int4 format and back (f32): the rounding `quantize_model(..., "awq")` will apply, so
    the search measures the error of the weights that are actually deployed."""
    return dequantize_int4(quantize_int4(w, group_size), jnp.float32)


def scale_from_magnitude(mag, alpha):
    """s = mag**alpha [C], normalised so that max(s) * min(s) = 1 (the scales straddle 1)."""
    s = jnp.maximum(mag.astype(jnp.float32), 1e-4) ** alpha
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("group_size", "num_grid"))
def search_scale(x, mag, w, *, group_size: int, num_grid: int = 20):
    """Grid-search the AWQ exponent for one group of Linears sharing an input.

    x [T, C] calibration inputs, mag [C] mean |x| per channel, w [C, O] the group's kernels side by side.
    Returns (s [C], alpha [], errors [num_grid]) where errors[j] is the output mean squared error at alphas[j]
    (alphas = linspace(0, 1, num_grid); errors[0] is RTN's).
    """
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    alphas = jnp.linspace(0.0, 1.0, num_grid) if num_grid > 1 else jnp.zeros((1,))

    def error(alpha):
        # (x / s) @ Q(s W) - x @ W = (x / s) @ (Q(s W) - s W): one matmul on the rounding error itself, so the
        # matmul's own precision (TF32 on GPU) is relative to the error, not to the outputs.
        s = scale_from_magnitude(mag, alpha)
        ws = w * s[:, None]
        return jnp.mean(jnp.square(jnp.dot(x / s, fake_quantize_int4(ws, group_size) - ws)))

    errors = jax.lax.map(error, alphas)
    best = jnp.argmin(errors)
    return scale_from_magnitude(mag, alphas[best]), alphas[best], errors


# ----------------------------------------------------------------------------------------------------------------
# Calibration forward


class _Recorder:
    """Stands in for a Linear inside one traced layer call and keeps its input."""

    def __init__(self, linear, sink: dict, name: str):
        self.linear, self.sink, self.name = linear, sink, name

    def __call__(self, x, out_dtype=None):
        self.sink[self.name] = x
        return self.linear(x, out_dtype)


@functools.partial(jax.jit, static_argnums=0)
def _layer_features(graphdef, layer_state, x, sample_index):
    """One decoder layer on x [b, S, D] -> (output [b, S, D], {group: (sum |input| [C], input rows [t, C])})."""
    layer = nnx.merge(graphdef, layer_state)
    sink: dict = {}
    layer.self_attn.q_proj = _Recorder(layer.self_attn.q_proj, sink, "qkv")  # k/v share q's input
    layer.self_attn.o_proj = _Recorder(layer.self_attn.o_proj, sink, "o")
    layer.mlp.gate_proj = _Recorder(layer.mlp.gate_proj, sink, "gate_up")
    layer.mlp.down_proj = _Recorder(layer.mlp.down_proj, sink, "down")
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # [b, S]
    y, _ = layer(x, positions, DenseCausal(), None, 0)
    feats = {}
    for g in GROUPS:
        flat = sink[g].reshape(-1, sink[g].shape[-1]).astype(jnp.float32)  # [b*S, C]
        feats[g] = (jnp.sum(jnp.abs(flat), axis=0), flat[sample_index])
    return y, feats


def _check_model(model) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or cfg.is_gpt2 or not hasattr(model, "layers"):
        raise ValueError(f"AWQ calibration supports the Llama family (llama, mistral, qwen2, qwen3); got "
                         f"model_type={getattr(cfg, 'model_type', None)!r}")
    for path in (p for names in _GROUP_LINEARS.values() for p in names):
        linear = _module(model.layers, path)
        if type(linear) is not Linear:
            raise ValueError(f"AWQ calibration needs a float model; layers.{path} is {type(linear).__name__}")


def _module(root, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _group_kernel(layers, group: str, i: int):
    """The kernels of a group's Linears in layer i, side by side: [C, O_total]."""
    return jnp.concatenate([_module(layers, p).kernel[...][i] for p in _GROUP_LINEARS[group]], axis=1)


def _per_kv_head(mag, num_heads: int, num_kv_heads: int):
    """o_proj input magnitudes [N*H] -> averaged over the q-heads of each kv head, expanded back to [N*H]."""
    G = num_heads // num_kv_heads
    m = mag.reshape(num_kv_heads, G, -1).mean(axis=1, keepdims=True)  # [K, 1, H]
    return jnp.broadcast_to(m, (num_kv_heads, G, m.shape[-1])).reshape(-1)


def search_awq_scales(model, token_ids, config: AWQConfig = AWQConfig(), *, progress: bool = True) -> AWQScales:
    """Run the calibration forward on token_ids [B, S] and search every layer's scales (the model is unchanged)."""
    _check_model(model)
    cfg = model.config
    token_ids = np.asarray(token_ids, np.int32)
    if token_ids.ndim != 2 or token_ids.size == 0:
        raise ValueError(f"calibration token_ids must be a non-empty [B, S] array; got shape {token_ids.shape}")
    widths = {"qkv": cfg.hidden_size, "o": cfg.num_heads * cfg.head_dim, "gate_up": cfg.hidden_size,
              "down": cfg.intermediate_size}
    for g, width in widths.items():
        if width % config.group_size:
            raise ValueError(f"group_size={config.group_size} does not divide the {g} input width {width}")
    B, S = token_ids.shape
    batches = [token_ids[r:r + config.batch_size] for r in range(0, B, config.batch_size)]
    per_batch = math.ceil(config.max_search_tokens / len(batches))
    samples = [np.unique(np.linspace(0, b.size - 1, min(per_batch, b.size)).astype(np.int32)) for b in batches]
    hidden = [model.embed_tokens(jnp.asarray(b)) for b in batches]  # [b, S, D] each
    graphdef, state = nnx.split(model.layers)
    L = cfg.num_layers
    searched = tuple(g for g in GROUPS if config.scale_o_proj or g != "o")
    scales = {g: np.zeros((L, widths[g]), np.float32) if g in searched else None for g in GROUPS}
    alphas = {g: np.zeros((L,), np.float32) for g in searched}
    errors = {g: np.zeros((L, 2), np.float32) for g in searched}
    for i in tqdm(range(L), desc="AWQ calibration", unit="layer", disable=not progress, leave=False):
        layer_state = jax.tree.map(lambda a: a[i], state)
        abs_sum = {g: 0.0 for g in GROUPS}
        rows: dict[str, list] = {g: [] for g in GROUPS}
        for j, (x, idx) in enumerate(zip(hidden, samples)):
            hidden[j], feats = _layer_features(graphdef, layer_state, x, jnp.asarray(idx))
            for g, (total, sample) in feats.items():
                abs_sum[g] = abs_sum[g] + total
                rows[g].append(sample)
        for g in searched:
            mag = abs_sum[g] / (B * S)  # [C] mean |x| per input channel
            if g == "o":
                mag = _per_kv_head(mag, cfg.num_heads, cfg.num_kv_heads)
            x = jnp.concatenate(rows[g], axis=0)  # [T, C]
            s, alpha, errs = search_scale(x, mag, _group_kernel(model.layers, g, i), group_size=config.group_size,
                                          num_grid=config.num_grid)
            scales[g][i], alphas[g][i] = np.asarray(s), float(alpha)
            errors[g][i] = (float(errs[0]), float(jnp.min(errs)))
    return AWQScales(scales, alphas, errors)


# ----------------------------------------------------------------------------------------------------------------
# Folding


def _scale(var, factor) -> None:
    """var *= factor (broadcast), computed in f32 and stored in the variable's dtype."""
    value = var[...]
    var.set_value((value.astype(jnp.float32) * factor).astype(value.dtype))


def fold_awq_scales(model, scales: dict[str, np.ndarray | None]):
    """Fold per-layer scales into a Llama-family model in place and return it (see the module docstring).

    scales: group name -> s [L, C] (or None to leave the group alone). In float the logits do not change.
    """
    _check_model(model)
    cfg = model.config
    layers = model.layers
    attn, mlp = layers.self_attn, layers.mlp
    s = {g: None if scales.get(g) is None else jnp.asarray(scales[g], jnp.float32) for g in GROUPS}
    if s["qkv"] is not None:  # [L, D]
        _scale(layers.input_layernorm.weight, 1 / s["qkv"])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            _scale(lin.kernel, s["qkv"][:, :, None])
    if s["o"] is not None:  # [L, N*H], equal across the q-heads of one kv head
        L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        grouped = s["o"].reshape(L, K, cfg.num_heads // K, H)
        if not np.allclose(np.asarray(grouped), np.asarray(grouped[:, :, :1]), rtol=1e-6):
            raise ValueError("o_proj scales differ between q-heads that share a kv head; v_proj cannot absorb them")
        s_kv = grouped[:, :, 0].reshape(L, K * H)  # [L, K*H]
        _scale(attn.v_proj.kernel, 1 / s_kv[:, None, :])
        if attn.v_proj.bias is not None:
            _scale(attn.v_proj.bias, 1 / s_kv)
        _scale(attn.o_proj.kernel, s["o"][:, :, None])
    if s["gate_up"] is not None:  # [L, D]
        _scale(layers.post_attention_layernorm.weight, 1 / s["gate_up"])
        for lin in (mlp.gate_proj, mlp.up_proj):
            _scale(lin.kernel, s["gate_up"][:, :, None])
    if s["down"] is not None:  # [L, F]
        _scale(mlp.up_proj.kernel, 1 / s["down"][:, None, :])
        if mlp.up_proj.bias is not None:
            _scale(mlp.up_proj.bias, 1 / s["down"])
        _scale(mlp.down_proj.kernel, s["down"][:, :, None])
    return model


def awq_calibrate(model, token_ids, config: AWQConfig = AWQConfig(), *, progress: bool = True):
    """Search AWQ scales on token_ids [B, S] and fold them into the model in place. Returns (model, AWQScales);
    quantize the returned float model with `quantize_model(model, "awq", group_size=config.group_size)`."""
    found = search_awq_scales(model, token_ids, config, progress=progress)
    return fold_awq_scales(model, found.scales), found


def calibration_rows(token_ids, num_samples: int, seq_len: int) -> np.ndarray:
    """Cut a token stream into at most num_samples non-overlapping rows of seq_len, spread evenly over the stream:
    int32 [B, seq_len]."""
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"{num_samples=} and {seq_len=} must be >= 1")
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    available = len(ids) // seq_len
    if available == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one row of {seq_len=}")
    picks = np.unique(np.linspace(0, available - 1, min(num_samples, available)).round().astype(np.int64))
    return np.stack([ids[p * seq_len:(p + 1) * seq_len] for p in picks])
