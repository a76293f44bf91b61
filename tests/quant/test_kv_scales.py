"""Static fp8 KV-cache scales (ie_jax/quant/kv_scales.py): read from a checkpoint under the names vLLM reads,
written back, calibrated by scripts/quantize.py --kv-cache-scales, and used by the engine's fp8 cache, where
they keep K and V that exceed e4m3's range from being clipped."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import ie_jax
from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from ie_jax import SamplingParams
from ie_jax.quant import kv_scales
from ie_jax.weights import CheckpointError, save_hf_checkpoint
from kernels_pallas import ops

ROOT = Path(__file__).resolve().parents[2]
L = 2  # tiny-llama's layers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, _ = ie_jax.load_model("tiny-llama", dtype="float32", seed=3)
    out = tmp_path_factory.mktemp("tiny")
    save_hf_checkpoint(model, model.config, out)
    return out


def with_tensors(src: Path, dst: Path, extra: dict[str, np.ndarray]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({**tensors, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_match_names_vllm_reads():
    assert kv_scales.match("model.layers.3.self_attn.k_scale") == (3, "k")
    assert kv_scales.match("model.layers.3.self_attn.v_scale") == (3, "v")
    assert kv_scales.match("model.layers.0.self_attn.kv_scale") == (0, "kv")
    assert kv_scales.match("model.layers.12.self_attn.k_proj.output_scale") == (12, "k")
    assert kv_scales.match("model.layers.12.self_attn.v_proj.v_scale") == (12, "v")
    assert kv_scales.match("model.layers.1.self_attn.attn.k_scale") == (1, "k")
    for other in ("model.layers.1.self_attn.k_proj.weight_scale", "model.layers.1.self_attn.k_proj.input_scale",
                  "model.layers.1.mlp.up_proj.output_scale", "model.layers.1.self_attn.q_scale"):
        assert kv_scales.match(other) is None, other


@pytest.mark.parametrize("spelling", ["self_attn.{w}_scale", "self_attn.{w}_proj.output_scale",
                                      "self_attn.{w}_proj.{w}_scale", "kv"])
def test_checkpoint_scales_load_in_every_spelling(tiny_dir, tmp_path, spelling):
    rng = np.random.default_rng(0)
    k, v = rng.uniform(0.01, 2.0, L), rng.uniform(0.01, 2.0, L)
    if spelling == "kv":  # one scale for both
        v = k
        extra = {f"model.layers.{i}.self_attn.kv_scale": np.array(k[i], np.float32) for i in range(L)}
    else:
        extra = {f"model.layers.{i}." + spelling.format(w=w): np.asarray([s[i]], np.float32)
                 for w, s in (("k", k), ("v", v)) for i in range(L)}
    model, _ = ie_jax.load_model(str(with_tensors(tiny_dir, tmp_path / "ckpt", extra)), progress=False)
    np.testing.assert_allclose(model.kv_cache_scales, np.stack([k, v]).astype(np.float32), rtol=1e-7)
    # written back under the first spelling, read again unchanged
    save_hf_checkpoint(model, model.config, tmp_path / "again")
    assert "model.layers.1.self_attn.v_scale" in load_file(str(tmp_path / "again" / "model.safetensors"))
    again, _ = ie_jax.load_model(str(tmp_path / "again"), progress=False)
    assert again.kv_cache_scales == model.kv_cache_scales


def test_bad_scales_are_refused(tiny_dir, tmp_path):
    def load(extra, name):
        return ie_jax.load_model(str(with_tensors(tiny_dir, tmp_path / name, extra)), progress=False)

    with pytest.raises(CheckpointError, match=r"some layers only; missing 3.*layers\.1\.self_attn\.k_scale"):
        load({"model.layers.0.self_attn.k_scale": np.array(0.5, np.float32)}, "partial")
    with pytest.raises(CheckpointError, match="positive, finite"):
        load({f"model.layers.{i}.self_attn.kv_scale": np.array(-1.0 if i else 1.0, np.float32) for i in range(L)},
             "negative")
    with pytest.raises(CheckpointError, match=r"shape \(4,\); only one scale per layer"):
        load({f"model.layers.{i}.self_attn.kv_scale": np.ones(4, np.float32) for i in range(L)}, "per_head")
    with pytest.raises(CheckpointError, match="layer 5, but the model has 2 layers"):
        load({f"model.layers.{i}.self_attn.kv_scale": np.array(1.0, np.float32) for i in (0, 1, 5)}, "extra")
    plain, _ = ie_jax.load_model(str(tiny_dir), progress=False)
    assert getattr(plain, "kv_cache_scales", None) is None


def loud_model(seed=4, gain=4000.0):
    """tiny-llama with K and V `gain` times larger, far beyond e4m3's 448, and q and o_proj `gain` times smaller: the
    same function (scores and outputs unchanged), but an fp8 cache without scales clips K and V."""
    model, tok = ie_jax.load_model("tiny-llama", dtype="float32", seed=seed)
    attn = model.layers.self_attn  # stacked: every layer at once
    for proj, factor in ((attn.k_proj, gain), (attn.v_proj, gain), (attn.q_proj, 1 / gain), (attn.o_proj, 1 / gain)):
        proj.kernel[...] = proj.kernel[...] * factor
    return model, tok


def test_calibrated_scales_cover_the_largest_k_and_v():
    model, tok = loud_model()
    rows = np.random.default_rng(1).integers(0, 256, (3, 40))
    k, v = kv_scales.calibrate(model, rows, batch_size=2)
    assert len(k) == len(v) == L
    from ie_jax.models.context import ContiguousCache  # the same forward, its cache read directly
    ctx = ContiguousCache.allocate(L, 3, 40, model.config.num_kv_heads, model.config.head_dim, np.float32)
    _, ctx = model(rows, np.broadcast_to(np.arange(40), (3, 40)), ctx)
    np.testing.assert_allclose(np.asarray(k) * 448, np.abs(np.asarray(ctx.k)).max(axis=(1, 2, 3, 4)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(v) * 448, np.abs(np.asarray(ctx.v)).max(axis=(1, 2, 3, 4)), rtol=1e-5)
    assert min(k) * 448 > 1000 and min(v) * 448 > 1000  # the gain did its job: unscaled, fp8 would clip these


def _first_logprobs(model, tok, kv_cache_dtype, prompts):
    # one token bucket (64: the three prompts' prefill is one step, as it was): 2 executables to compile, not 5
    llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64, page_size=8,
              token_buckets=(64,), progress=False, kv_cache_dtype=kv_cache_dtype)
    with ops.kernel_backend("reference"):
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=5))
    return llm, [o.outputs[0].logprobs for o in outs]


def test_engine_fp8_cache_uses_the_checkpoints_scales(tmp_path):
    """Through quantize.py --kv-cache-scales and the loader: with the scales, the fp8 cache's first-token logprobs
    stay near the 16-bit cache's; without them (scale 1) K and V clip at 448 and the logprobs move far more (on
    this CPU: 0.003 against 0.044)."""
    model, tok = loud_model()
    src = tmp_path / "loud"
    save_hf_checkpoint(model, model.config, src)
    tok.save_pretrained(src)
    spec = importlib.util.spec_from_file_location("quantize_script", ROOT / "scripts" / "quantize.py")
    quantize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quantize)
    calib = tmp_path / "calib.txt"
    calib.write_text((ROOT / "README.md").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    args = quantize.parse_args(["--model", str(src), "--out", str(tmp_path / "fp8"), "--method", "fp8",
                                "--kv-cache-scales", "--calib", str(calib), "--calib-samples", "4",
                                "--calib-seq-len", "48", "--quiet"])
    quantized, out = quantize.quantize(args, log=lambda *a: None)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:  # (load_file cannot read e4m3)
        assert "model.layers.0.self_attn.k_scale" in f.keys()
    loaded, tok2 = ie_jax.load_model(str(out), dtype="float32", progress=False)
    assert loaded.kv_cache_scales == quantized.kv_cache_scales and min(loaded.kv_cache_scales[0]) > 1.0

    prompts = ["The engine runs", "KV pages", "0123456789 abc"]
    _, ref = _first_logprobs(nnx.clone(loaded), tok2, "auto", prompts)
    llm, scaled = _first_logprobs(nnx.clone(loaded), tok2, "fp8", prompts)
    np.testing.assert_allclose(np.asarray(llm.engine.runner.caches[1])[:, 0], loaded.kv_cache_scales[0])
    unscaled_model = nnx.clone(loaded)
    unscaled_model.kv_cache_scales = None
    _, unscaled = _first_logprobs(unscaled_model, tok2, "fp8", prompts)

    def error(runs):  # mean |logprob difference| over the tokens both first-token top-5s hold
        diffs = [abs(run[0][t] - lp) for run, r in zip(runs, ref) for t, lp in r[0].items() if t in run[0]]
        return float(np.mean(diffs))

    e_scaled, e_unscaled = error(scaled), error(unscaled)
    print(f"first-token top-5 logprob error: scaled {e_scaled:.4f}, unscaled {e_unscaled:.4f}")
    assert e_scaled < 0.01  # a random tiny model's logprobs are near-flat (~ -5.2): small differences matter
    assert e_unscaled > 5 * e_scaled


def test_calculate_kv_scales_at_start_up():
    """vLLM's --calculate-kv-scales: an fp8 cache whose checkpoint has no scales gets them from a calibration
    forward over the bundled text at start-up; scales from the checkpoint win; a 16-bit cache ignores the flag."""
    from ie_jax.quant.calibration import bundled_calibration_text, calibration_ids
    model, tok = loud_model()
    # one token bucket: start-up compiles 2 step executables, not 4 (the scales are set before any compiles)
    llm = LLM(nnx.clone(model), tokenizer=tok, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=8,
              token_buckets=(8,), page_size=8, progress=False, kv_cache_dtype="fp8", calculate_kv_scales=True)
    rows = calibration_ids(tok, bundled_calibration_text()[0], 8, 512, model.config.max_position_embeddings)
    k, v = kv_scales.calibrate(model, rows)
    caches = llm.engine.runner.caches
    np.testing.assert_allclose(np.asarray(caches[1]), np.broadcast_to(np.asarray(k)[:, None], caches[1].shape),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(caches[2])[:, 0], v, rtol=1e-6)
    assert min(k) > 1.0  # K reaches thousands here: unit scales would clip it

    # The engine picks the scales in its constructor, before warm-up (which compiles steps and, on CPU, runs none):
    # the same constructor as LLM's (EngineConfig from the same arguments), without the compiles nothing here runs.
    def engine(m, **kw):
        return LLMEngine(m, tok, EngineConfig(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32, page_size=8,
                                              calculate_kv_scales=True, **kw), warmup=False, progress=False)

    given = nnx.clone(model)
    given.kv_cache_scales = ((2.0,) * L, (3.0,) * L)
    runner = engine(given, kv_cache_dtype="fp8").runner
    assert float(runner.caches[1].max()) == 2.0 and float(runner.caches[2].min()) == 3.0
    assert float(runner.caches[1].min()) == 2.0 and float(runner.caches[2].max()) == 3.0
    assert len(engine(nnx.clone(model)).runner.caches) == 1  # 16-bit cache: no scales at all
