"""scripts/bench_compile.py on this CPU: each variant runs in its own process, every (shape, rows, kind) is timed
and correct (the fp8 dot against the bf16 one), and the JSON holds what the table printed, written row by row."""
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_compile", ROOT / "scripts" / "bench_compile.py")
bc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bc)


def test_two_variants_in_their_own_processes(tmp_path, capsys):
    out = tmp_path / "c.json"
    bc.main(["--rows", "8", "--shapes", "o", "--variants", "default,no_triton_gemm", "--iters", "1",
             "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["kind"]) for r in rows] == [("default", "fp8"), ("default", "bf16"),
                                                         ("no_triton_gemm", "fp8"), ("no_triton_gemm", "bf16")]
    assert all(r["finite"] and r["compile_s"] >= 0 and r["us"] > 0 and r["M"] == 8 for r in rows)
    printed = capsys.readouterr().out
    assert printed.count(" o  ") + printed.count(" o ") >= 4 and str(out) in printed


def test_the_fp8_dot_it_times_follows_the_bf16_one():
    """What the child times is the engine's fp8 path: its output is within e4m3's error of the bf16 dot."""
    from kernels_pallas.fp8_matmul import fp8_matmul
    kw, kx = jax.random.split(jax.random.key(1))
    w = jax.random.normal(kw, (64, 32), jnp.float32)
    x = jax.random.normal(kx, (8, 32), jnp.float32)
    q = (w / 2).astype(jnp.float8_e4m3fn)
    y = np.asarray(fp8_matmul(x, q, jnp.full((64,), 2.0, jnp.float32), n_major=True), np.float32)
    ref = np.asarray(x @ w.T)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.08
