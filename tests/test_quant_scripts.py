"""scripts/quantize.py and scripts/eval_ppl.py end to end on the tiny preset: every method writes a checkpoint that
ie_jax loads and generates from, AWQ's checkpoint re-imports to the same arrays, and perplexity is computed right."""
import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ie_jax

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"  # random weights (seed 0), byte tokenizer; D=64, N*H=64, F=128: group size 32 divides all


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quantize_script, eval_script = _script("quantize"), _script("eval_ppl")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 6k bytes of varied English (the project's own README) as the data and calibration text."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text((ROOT / "README.md").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return path


def _quantize(tmp_path, method, *extra):
    args = quantize_script.parse_args(["--model", MODEL, "--out", str(tmp_path / method), "--method", method,
                                       "--group-size", "32", "--quiet", *extra])
    return quantize_script.quantize(args, log=lambda *a: None)


# Relative L2 error of the loaded model's logits against the float model (random weights, so only the quantization
# noise of each format is measured): int8 and fp8 are near-lossless, int4 in groups of 32 is ~10x coarser.
LOGIT_TOLERANCE = {"int8": 0.02, "fp8": 0.08, "int4-rtn": 0.25, "awq": 0.25}
CHECKPOINT_METHOD = {"int8": "int8", "fp8": "fp8", "int4-rtn": "awq", "awq": "awq"}


@pytest.fixture(scope="module")
def reference_logits():
    """The float preset's logits on a fixed byte string: (token ids [1, S], logits [1, S, V])."""
    model, tokenizer = ie_jax.load_model(MODEL, dtype="float32", progress=False)
    ids = np.asarray(tokenizer.encode((ROOT / "README.md").read_text()[:64]))[None]
    return ids, ie_jax.forward(model, ids)


@pytest.mark.parametrize("method", ["int8", "int4-rtn", "awq", "fp8"])
def test_quantize_writes_a_checkpoint_that_loads_and_generates(tmp_path, text_file, reference_logits, method):
    extra = ["--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len", "64"] if method == "awq" else []
    _, out = _quantize(tmp_path, method, *extra)
    model, tokenizer = ie_jax.load_model(out, progress=False)
    assert model.config.quantization.method == CHECKPOINT_METHOD[method]
    assert tokenizer is not None and tokenizer.vocab_size == model.config.vocab_size
    [result] = ie_jax.generate(model, tokenizer, "Hello", ie_jax.SamplingParams(temperature=0.0, max_tokens=5))
    assert len(result.outputs[0].token_ids) == 5
    ids, expected = reference_logits
    err = float(jnp.linalg.norm(ie_jax.forward(model, ids) - expected) / jnp.linalg.norm(expected))
    assert 0 < err < LOGIT_TOLERANCE[method], err


def test_awq_checkpoint_reimports_to_the_same_arrays(tmp_path):
    model, out = _quantize(tmp_path, "awq", "--calib-samples", "2", "--calib-seq-len", "64")  # bundled text
    loaded, _ = ie_jax.load_model(out, progress=False)
    saved = dict(nnx.to_flat_state(nnx.state(model)))
    back = dict(nnx.to_flat_state(nnx.state(loaded)))
    assert saved.keys() == back.keys()
    assert ("layers", "mlp", "down_proj", "zeros") in saved  # the int4 codes, scales and zeros are compared
    for key, var in saved.items():
        a, b = np.asarray(var.get_value()), np.asarray(back[key].get_value())
        assert a.dtype == b.dtype and a.shape == b.shape, key
        np.testing.assert_array_equal(a, b, err_msg=str(key))
    # AWQ changed the float model before quantization: the norms carry the folded 1/s (random presets start at 1).
    assert not np.allclose(np.asarray(loaded.layers.input_layernorm.weight[...]), 1.0)


def test_quantize_refuses_clearly(tmp_path, capsys):
    code = quantize_script.main(["--model", "tiny-gpt2", "--out", str(tmp_path / "g"), "--method", "awq",
                                 "--quiet"])
    assert code == 2 and "Llama family" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quantize_script.parse_args(["--model", MODEL, "--out", "x", "--method", "int8", "--calib", "README.md"])
    with pytest.raises(SystemExit):
        quantize_script.parse_args(["--model", MODEL, "--out", "x", "--method", "int4"])


# ----------------------------------------------------------------------------------------------------------------
# Perplexity


@pytest.mark.parametrize("num_tokens,seq_len,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 16), (40, 8, 1)])
def test_windows_score_every_token_once(num_tokens, seq_len, stride):
    scored, spans = [], eval_script.windows(num_tokens, seq_len, stride)
    for begin, end, first in spans:
        assert end - begin <= seq_len and begin < first <= end
        assert first - begin >= min(seq_len - stride, begin)  # context of at least seq_len - stride tokens
        scored += range(first, end)
    assert spans[-1][1] == num_tokens
    # Every position after the first, except, for non-overlapping windows, each later window's first token.
    skipped = set(range(seq_len, num_tokens, seq_len)) if stride == seq_len else set()
    assert scored == [p for p in range(1, num_tokens) if p not in skipped]


@pytest.mark.parametrize("stride", [None, 7])
def test_perplexity_matches_a_direct_computation(stride):
    model, _ = ie_jax.load_model(MODEL, dtype="float32", progress=False)
    ids = np.asarray(jax.random.randint(jax.random.key(0), (70,), 0, 256), np.int32)
    seq_len = 16
    got = eval_script.perplexity(model, ids, seq_len, stride, batch_size=3, progress=False)
    # Reference: every window on its own through ie_jax.forward, numpy log-softmax, HF-style stride bookkeeping.
    step, nll, count, prev_end = stride or seq_len, 0.0, 0, 0
    for begin in range(0, len(ids), step):
        end = min(begin + seq_len, len(ids))
        logits = np.asarray(ie_jax.forward(model, ids[None, begin:end])[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for pos in range(max(prev_end, begin + 1), end):
            nll -= logp[pos - begin - 1, ids[pos]]
            count += 1
        prev_end = end
        if end == len(ids):
            break
    assert got["tokens"] == count == (len(ids) - 1 if stride else len(ids) - math.ceil(len(ids) / seq_len))
    np.testing.assert_allclose(got["nll"], nll / count, rtol=1e-5)
    np.testing.assert_allclose(got["ppl"], math.exp(nll / count), rtol=1e-5)


def _eval(text_file, *extra):
    args = eval_script.parse_args(["--model", MODEL, "--data", str(text_file), "--seq-len", "64", "--batch-size",
                                   "4", "--quiet", *extra])
    return eval_script.evaluate(args, log=lambda *a: None)


def test_eval_ppl_bf16_and_int8_agree(text_file, tmp_path):
    out = tmp_path / "ppl.json"
    bf16 = _eval(text_file, "--dtype", "bfloat16", "--max-tokens", "2000", "--json", str(out))
    int8 = _eval(text_file, "--dtype", "bfloat16", "--max-tokens", "2000", "--quantization", "int8")
    assert bf16["tokens"] == int8["tokens"] == 2000 - math.ceil(2000 / 64)  # a window's first token is context
    assert math.isfinite(bf16["ppl"]) and bf16["ppl"] > 1
    assert abs(int8["ppl"] / bf16["ppl"] - 1) < 0.01, (bf16["ppl"], int8["ppl"])
    assert json.loads(out.read_text())["ppl"] == pytest.approx(bf16["ppl"])
    assert bf16["dtype"] == int8["dtype"] == "bfloat16"


def test_eval_ppl_awq_calibrates_on_a_held_out_slice(text_file):
    result = _eval(text_file, "--quantization", "awq", "--group-size", "32", "--calib-samples", "4",
                   "--calib-seq-len", "64")
    n = len(text_file.read_bytes())  # byte tokenizer: one token per byte
    held_out = min(4 * 64, n // 4)
    assert f"tokens [{n - held_out}, {n})" in result["calibration"]["source"]
    assert result["calibration"]["rows"] == 4 and result["tokens"] < n - held_out
    assert math.isfinite(result["ppl"])
