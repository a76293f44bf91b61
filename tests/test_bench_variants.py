"""scripts/bench_variants.py: variant parsing, the per-variant medians and ratios, and a failing run recorded as
such (the full path runs the engine: measured on the GPU, not here)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_variants", ROOT / "scripts" / "bench_variants.py")
bv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bv)


def test_parse_variant():
    assert bv.parse_variant("plain=") == ("plain", {})
    assert bv.parse_variant("rope=IE_JAX_FUSED_ROPE_KV=1,IE_JAX_ROPE_KV_WARPS=2") == (
        "rope", {"IE_JAX_FUSED_ROPE_KV": "1", "IE_JAX_ROPE_KV_WARPS": "2"})
    assert bv.parse_variant("opts=IE_JAX_XLA_OPTIONS=a=b") == ("opts", {"IE_JAX_XLA_OPTIONS": "a=b"})
    for bad in ("plain", "=X=1", "v=X"):
        with pytest.raises(ValueError, match="variant"):
            bv.parse_variant(bad)


def test_summary_takes_medians_per_variant_and_ratios_to_the_first():
    runs = [{"variant": v, "decode_step_ms_median": s, "decode_tok_s_per_seq": 1e3 / s, "output_tok_s": 1e3 / s - 5,
             "step_ms_median": s + 0.01} for v, s in [("a", 4.30), ("b", 4.20), ("a", 4.28), ("b", 4.26), ("a", 4.40),
                                                      ("b", 4.24)]]
    runs.append({"variant": "b", "error": "crashed"})  # a failed run counts nowhere
    out = bv.summarize(runs, ["a", "b"])
    assert out["a"]["runs"] == 3 and out["b"]["runs"] == 3
    assert out["a"]["decode_step_ms_median"] == pytest.approx(4.30)
    assert out["b"]["decode_step_ms_median"] == pytest.approx(4.24)
    assert out["b"]["step_ratio_to_a"] == pytest.approx(4.24 / 4.30) and out["a"]["step_ratio_to_a"] == 1.0
    assert out["b"]["decode_tok_s_per_seq"] == pytest.approx(1e3 / 4.24)


def test_failed_runs_are_recorded_and_fail_the_call(tmp_path, capsys):
    rc = bv.main(["--repeats", "1", "--variant", "a=", "--out", str(tmp_path), "--timeout", "120", "--",
                  "--model", "no-such-model"])
    assert rc == 1
    (path,) = tmp_path.glob("variants_*.json")
    res = json.loads(path.read_text())
    assert res["runs"][0]["variant"] == "a" and "no-such-model" in res["runs"][0]["error"]
    assert res["summary"]["a"]["runs"] == 0 and "FAILED" in capsys.readouterr().out
