"""HF checkpoint I/O: load `*.safetensors` (single or sharded) into a sharded model, and save back to HF format.

The mapping is a table per family: an HF name template ↔ a parameter path template, and whether the tensor is
transposed (HF nn.Linear stores [out, in]; our kernels are [in, out]). `{layer}` marks the stacked layer index;
other `{x}` fields range over listed choices. The same table drives loading and saving.

Quantized checkpoints (config `quantization_config`) use the same table: the dense kernel rule of every quantized
projection becomes a module rule whose tensors (`qweight`, `scales`, ... per method, ie_jax/quant/checkpoint.py)
are gathered per layer and repacked together into that Linear's variables.

Loading streams tensor by tensor: each one is read from a memory map, cast, and placed onto its sharding (stacked
layers are written into a preallocated sharded array, slice by slice), so host memory peaks near one tensor.
Missing, unexpected and mis-shaped tensors raise, naming the tensor and both shapes. Pickle checkpoints
(`*.bin`, `*.pt`) are never read: they can execute code.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from ie_jax.config import ModelConfig
from ie_jax.models import build_model
from ie_jax.quant import checkpoint as qckpt
from ie_jax.quant import kv_scales
from ie_jax.quant.linear import QuantLinear, convert_linears
from ie_jax.sharding import single_device_shardings, state_shardings


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # e.g. "model.layers.{layer}.self_attn.{p}.weight"
    path: str  # e.g. "layers.self_attn.{p}.kernel"
    transpose: bool = False
    choices: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @functools.cached_property
    def regex(self) -> re.Pattern:
        pattern = re.escape(self.hf).replace(r"\{layer\}", r"(?P<layer>\d+)")
        for key, options in self.choices:
            pattern = pattern.replace(rf"\{{{key}\}}", f"(?P<{key}>{'|'.join(map(re.escape, options))})")
        return re.compile(pattern + "$")

    def expand(self):
        """Every (hf_template_with_layer, param_path) this rule covers."""
        keys = [k for k, _ in self.choices]
        for values in itertools.product(*(opts for _, opts in self.choices)):
            sub = dict(zip(keys, values))
            yield self.hf.replace("{layer}", "{{layer}}").format(**sub), self.path.format(**sub)


def _r(hf, path, transpose=False, **choices):
    return Rule(hf, path, transpose, tuple((k, tuple(v)) for k, v in choices.items()))


LLAMA_RULES = (
    _r("model.embed_tokens.weight", "embed_tokens.embedding"),
    _r("model.layers.{layer}.self_attn.{p}.weight", "layers.self_attn.{p}.kernel", True,
       p=("q_proj", "k_proj", "v_proj", "o_proj")),
    _r("model.layers.{layer}.self_attn.{p}.bias", "layers.self_attn.{p}.bias",
       p=("q_proj", "k_proj", "v_proj", "o_proj")),
    _r("model.layers.{layer}.self_attn.{p}.weight", "layers.self_attn.{p}.weight", p=("q_norm", "k_norm")),
    _r("model.layers.{layer}.mlp.{p}.weight", "layers.mlp.{p}.kernel", True, p=("gate_proj", "up_proj", "down_proj")),
    _r("model.layers.{layer}.mlp.{p}.bias", "layers.mlp.{p}.bias", p=("gate_proj", "up_proj", "down_proj")),
    _r("model.layers.{layer}.{p}.weight", "layers.{p}.weight", p=("input_layernorm", "post_attention_layernorm")),
    _r("model.norm.weight", "norm.weight"),
    _r("lm_head.weight", "lm_head.kernel", True),
)
GPT2_RULES = (
    _r("transformer.{p}.weight", "{p}.embedding", p=("wte", "wpe")),
    _r("transformer.h.{layer}.{p}.{w}", "h.{p}.{w}", p=("ln_1", "ln_2"), w=("weight", "bias")),
    _r("transformer.h.{layer}.{p}.weight", "h.{p}.kernel", p=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    _r("transformer.h.{layer}.{p}.bias", "h.{p}.bias", p=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    _r("transformer.ln_f.{w}", "ln_f.{w}", w=("weight", "bias")),
)
# Buffers some checkpoints carry that are not parameters (recomputed here).
IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|transformer\.h\.\d+\.attn\.(masked_)?bias)$")


def rules_for(cfg: ModelConfig) -> tuple[Rule, ...]:
    return GPT2_RULES if cfg.is_gpt2 else LLAMA_RULES


def quant_rules(cfg: ModelConfig, is_quantized) -> tuple[Rule, ...]:
    """Module rules for the quantized projections: "model.layers.{layer}.mlp.{p}.{t}" <-> "layers.mlp.{p}", {t}
    ranging over the method's tensor suffixes. `is_quantized(module_path)` says which dense kernel rules apply."""
    if cfg.quantization is None:
        return ()
    required, optional = qckpt.module_tensors(cfg.quantization)
    out = []
    for rule in rules_for(cfg):
        if rule.hf.endswith(".weight") and rule.path.endswith(".kernel") and any(
                is_quantized(p.removesuffix(".kernel")) for _, p in rule.expand()):
            out.append(Rule(rule.hf.removesuffix(".weight") + ".{t}", rule.path.removesuffix(".kernel"),
                            rule.transpose, rule.choices + (("t", required + optional),)))
    return tuple(out)


class CheckpointError(ValueError):
    """A checkpoint does not match the model: the message names the tensor and both shapes."""


# ----------------------------------------------------------------------------------------------------------------
# Model creation


def _flat(state) -> dict[str, nnx.Variable]:
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


def _build(cfg: ModelConfig, dtype, seed: int) -> nnx.Module:
    """The model of `cfg`, its projections in the quantized format when cfg.quantization is set."""
    model = build_model(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    if cfg.quantization is not None:
        convert_linears(model, cfg.quantization)  # no-op for projections that make_linear already built quantized
    return model


def abstract_model(cfg: ModelConfig, dtype):
    return nnx.split(nnx.eval_shape(lambda: _build(cfg, dtype, 0)))


def _shardings(abs_state, mesh, rules):
    return single_device_shardings(abs_state) if mesh is None else state_shardings(abs_state, mesh, rules)


def init_model(cfg: ModelConfig, *, dtype=jnp.float32, mesh=None, rules="tp", seed: int = 0) -> nnx.Module:
    """Random weights (std 0.02, norms at 1), created directly on their shardings: `--load-format dummy`.
    With cfg.quantization the projections are those random weights quantized (the float copy never leaves jit)."""
    try:
        graphdef, init = _initializer(cfg, dtype, mesh, rules, seed)
    except TypeError:  # an unhashable argument (rules given as a dict): build it afresh
        graphdef, init = _initializer.__wrapped__(cfg, dtype, mesh, rules, seed)
    return nnx.merge(graphdef, init())


@functools.lru_cache(maxsize=16)
def _initializer(cfg: ModelConfig, dtype, mesh, rules, seed: int):
    """The model's graph and a jitted function making its random state, kept per configuration: a second model of
    the same configuration reuses the compiled initializer (seconds on CPU) instead of compiling it again."""
    graphdef, abs_state = abstract_model(cfg, dtype)
    shardings = _shardings(abs_state, mesh, rules)
    return graphdef, jax.jit(lambda: nnx.state(_build(cfg, dtype, seed)), out_shardings=shardings)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("model-*.safetensors")) or sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ValueError(f"{path} holds only pickle weights {pickled[:3]}; those are never loaded (they can run "
                         f"code). Convert them to safetensors, e.g. with transformers' save_pretrained.")
    raise FileNotFoundError(f"no *.safetensors weights in {path}")


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _set_layer(stacked, index, value, sharding):
    return jax.lax.with_sharding_constraint(stacked.at[index].set(value), sharding)


def load_hf_weights(path, cfg: ModelConfig, *, dtype=jnp.float32, mesh=None, rules="tp",
                    progress: bool = True) -> nnx.Module:
    """Load an HF safetensors checkpoint directory into a new model (see module docstring)."""
    files = checkpoint_files(path)
    handles = [_open(f) for f in files]
    names = [n for h in handles for n in h.keys()]
    if cfg.quantization is not None:
        cfg = dataclasses.replace(cfg, quantization=qckpt.adjust_config(cfg.quantization, names))
    graphdef, abs_state = abstract_model(cfg, dtype)
    flat_abs = _flat(abs_state)
    shardings = {k: v.get_value() for k, v in _flat(_shardings(abs_state, mesh, rules)).items()}
    arrays: dict[str, jax.Array] = {}
    filled: dict[str, set[int]] = {k: set() for k in flat_abs}
    table = rules_for(cfg)
    qtable = quant_rules(cfg, lambda module: f"{module}.q" in flat_abs)
    pending: dict[tuple[str, int | None], dict[str, np.ndarray]] = {}  # (module, layer) -> tensors seen so far
    kv_found: dict[tuple[int, str], float] = {}  # fp8 KV-cache scales: (layer, "k" | "v" | "kv") -> scale

    def check(param: str, layer, shape: tuple[int, ...], name: str, transpose: bool = False):
        expected = flat_abs[param].shape[1:] if layer is not None else flat_abs[param].shape
        if (shape[::-1] if transpose else shape) != tuple(expected):
            raise CheckpointError(f"tensor {name!r} has shape {shape} but parameter {param} expects "
                                  f"{tuple(expected[::-1]) if transpose else tuple(expected)} "
                                  f"(HF layout{', transposed on load' if transpose else ''})")

    def put(param: str, layer, value, name: str, transpose: bool = False):
        """Check `value` (HF layout, one layer) against `param` and write it into its slice."""
        target = flat_abs[param]
        check(param, layer, tuple(value.shape), name, transpose)
        value = (value.T if transpose else value).astype(target.dtype)
        if layer is None:
            arrays[param] = jax.device_put(np.ascontiguousarray(value), shardings[param])
            filled[param].add(-1)
            return
        i = int(layer)
        if i >= target.shape[0]:
            raise CheckpointError(f"unexpected tensor {name!r}: layer {i} >= num_layers={target.shape[0]}")
        if param not in arrays:
            arrays[param] = jax.jit(lambda s=target.shape, d=target.dtype: jnp.zeros(s, d),
                                    out_shardings=shardings[param])()
        arrays[param] = _set_layer(arrays[param], i, value, shardings[param])
        filled[param].add(i)

    def put_module(module: str, layer, tensors: dict[str, np.ndarray], hf_module: str):
        """Repack one layer's quantized tensors of `module` into its variables (checkpoint.repack)."""
        K, N = qckpt.matrix_shape(cfg.quantization, flat_abs[f"{module}.q"].shape)
        for t, shape in qckpt.hf_shapes(cfg.quantization, K, N).items():
            if t in tensors and shape is not None and tuple(tensors[t].shape) != shape:
                raise CheckpointError(f"tensor {hf_module}.{t!s} has shape {tuple(tensors[t].shape)} but the "
                                      f"{cfg.quantization.method} projection [{K} -> {N}] expects {shape}")
        try:
            values = qckpt.repack(cfg.quantization, tensors, K, N)
        except ValueError as e:
            raise CheckpointError(f"cannot repack {hf_module}: {e}") from e
        for var, value in values.items():
            put(f"{module}.{var}", layer, np.asarray(value), f"{hf_module} ({var})")

    required, optional = qckpt.module_tensors(cfg.quantization) if qtable else ((), ())
    # Wait only for optional tensors this checkpoint has at all, so modules are placed as soon as they are complete.
    optional = tuple(t for t in optional if any(n.endswith("." + t) for n in names))
    bar = tqdm(total=len(names), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    for file, handle in zip(files, handles):
        for name in handle.keys():
            bar.update()
            hf_name = _normalise(name, cfg)
            if IGNORED.match(hf_name) or (cfg.tie_word_embeddings and hf_name == "lm_head.weight"):
                continue
            if (kv := kv_scales.match(hf_name)) is not None:
                try:
                    kv_found[kv] = kv_scales.scale_value(name, _get_tensor(handle, file, name))
                except ValueError as e:
                    raise CheckpointError(str(e)) from e
                continue
            rule, match = _match(qtable, hf_name)
            if rule is not None:  # a tensor of a quantized projection: gather the module's tensors per layer
                groups = match.groupdict()
                module = rule.path.format(**{k: v for k, v in groups.items() if k not in ("layer", "t")})
                layer = groups.get("layer")
                key = (module, None if layer is None else int(layer))
                pending.setdefault(key, {})[groups["t"]] = _get_tensor(handle, file, name)
                if set(pending[key]) >= set(required + optional):
                    put_module(module, layer, pending.pop(key), hf_name.removesuffix("." + groups["t"]))
                continue
            rule, match = _match(table, hf_name)
            param = rule.path.format(**{k: v for k, v in match.groupdict().items() if k != "layer"}) if rule else None
            if param not in flat_abs and qtable and hf_name.endswith(".bias") and param is not None:
                if not np.any(_get_tensor(handle, file, name)):
                    continue  # quantizers write an all-zero bias for projections that have none
            if param not in flat_abs:
                raise CheckpointError(f"unexpected tensor {name!r} in {file.name}: the {cfg.model_type} model has no "
                                      f"parameter for it")
            layer = match.groupdict().get("layer")
            check(param, layer, tuple(handle.get_slice(name).get_shape()), name, rule.transpose)  # before reading
            put(param, layer, _get_tensor(handle, file, name), name, rule.transpose)
    bar.close()
    missing = []
    for (module, layer), tensors in pending.items():
        hf = _hf_name_of(qtable, module, [layer if layer is not None else 0])
        lacking = [t for t in required if t not in tensors]
        if lacking:
            missing.extend(f"{hf.rsplit('.', 1)[0]}.{t}" for t in lacking)
        else:
            put_module(module, layer, tensors, hf.rsplit(".", 1)[0])
    for param, var in flat_abs.items():
        want = {-1} if param in arrays and filled[param] == {-1} else set(range(var.shape[0]))
        if not filled[param] or (filled[param] != {-1} and filled[param] != want):
            layers = sorted(want - filled[param])[:1] or [0]
            module = param.rsplit(".", 1)[0]
            if qtable and f"{module}.q" in flat_abs:
                missing.append(_hf_name_of(qtable, module, layers).rsplit(".", 1)[0] + f".{required[0]}")
            else:
                missing.append(_hf_name_of(table, param, layers))
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    state = nnx.from_flat_state({tuple(k.split(".")): flat_abs[k].replace(arrays[k]) for k in flat_abs})
    model = nnx.merge(graphdef, state)
    if kv_found:
        try:
            model.kv_cache_scales = kv_scales.assemble(kv_found, cfg.num_layers)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from e
    return model


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {file}: {e} (corrupt or truncated header?)") from e


# safetensors' numpy reader has no float8 types; these are read from the file's bytes (ml_dtypes via jnp).
_RAW_DTYPES = {"F8_E4M3": jnp.float8_e4m3fn, "F8_E5M2": jnp.float8_e5m2}


@functools.lru_cache(maxsize=64)
def _header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def _get_tensor(handle, file: Path, name: str) -> np.ndarray:
    dtype = handle.get_slice(name).get_dtype()
    if dtype not in _RAW_DTYPES:
        return handle.get_tensor(name)
    base, header = _header(file)
    start, end = header[name]["data_offsets"]
    with open(file, "rb") as f:
        f.seek(base + start)
        data = f.read(end - start)
    return np.frombuffer(data, np.dtype(_RAW_DTYPES[dtype])).reshape(header[name]["shape"])


def _normalise(name: str, cfg: ModelConfig) -> str:
    if cfg.is_gpt2 and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name  # the original gpt2 checkpoints have no "transformer." prefix
    return name


def _match(table, name):
    for rule in table:
        m = rule.regex.match(name)
        if m:
            return rule, m
    return None, None


def _hf_name_of(table, param: str, layers) -> str:
    for rule in table:
        for hf, p in rule.expand():
            if p == param:
                return hf.format(layer=layers[0]) if "{layer}" in hf else hf
    return param


# ----------------------------------------------------------------------------------------------------------------
# Saving


def hf_tensors(model: nnx.Module, cfg: ModelConfig):
    """Yield (hf_name, numpy array) for every parameter, in HF layout, one tensor at a time."""
    flat = _flat(nnx.state(model, nnx.Param))
    for rule in rules_for(cfg):
        for hf, param in rule.expand():
            if param not in flat:
                continue
            value = np.asarray(jax.device_get(flat[param].get_value()))
            if "{layer}" in hf:
                for i in range(value.shape[0]):
                    yield hf.format(layer=i), np.ascontiguousarray(value[i].T if rule.transpose else value[i])
            else:
                yield hf, np.ascontiguousarray(value.T if rule.transpose else value)


def quantized_hf_tensors(model: nnx.Module, cfg: ModelConfig):
    """Yield (hf_name, numpy array) for every tensor of the quantized projections, in the method's HF format."""
    if cfg.quantization is None:
        return
    flat = {k: v.get_value() for k, v in _flat(nnx.state(model)).items()}
    modules = {".".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, QuantLinear)}
    for rule in quant_rules(cfg, lambda module: module in modules):
        seen = set()
        for hf, module in rule.expand():
            hf_module = hf.rsplit(".", 1)[0]
            if module not in modules or (hf_module, module) in seen:
                continue
            seen.add((hf_module, module))
            values = {k.removeprefix(module + "."): np.asarray(jax.device_get(v)) for k, v in flat.items()
                      if k.rsplit(".", 1)[0] == module}
            stacked = "{layer}" in hf_module
            for i in range(values["q"].shape[0] if stacked else 1):
                layer = {k: v[i] for k, v in values.items()} if stacked else values
                for t, tensor in qckpt.export(cfg.quantization, layer).items():
                    name = f"{hf_module.format(layer=i) if stacked else hf_module}.{t}"
                    yield name, np.ascontiguousarray(tensor)


def save_hf_checkpoint(model: nnx.Module, cfg: ModelConfig, out_dir, *, generation_config: dict | None = None,
                       max_shard_bytes: int = 5 * 2**30, dtype=None) -> Path:
    """Write config.json, generation_config.json and safetensors shards (+ index when more than one)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    dense = ((n, v.astype(dtype) if dtype is not None else v) for n, v in hf_tensors(model, cfg))
    extra = itertools.chain(quantized_hf_tensors(model, cfg), kv_scales.hf_tensors(model).items())
    for name, value in itertools.chain(dense, extra):  # quantized arrays and scales keep their dtypes
        if current and size + value.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += value.nbytes
    shards.append(current)
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    if len(shards) > 1:
        total = sum(v.nbytes for s in shards for v in s.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = cfg.to_hf()
    hf_config["torch_dtype"] = str(np.dtype(dtype or next(iter(shards[0].values())).dtype))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    if generation_config:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out
