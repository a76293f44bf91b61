"""Fine-tuning throughput and peak memory on one GPU: ie_jax LoRA / QLoRA against HF PEFT, in one job.

    python scripts/bench_finetune.py [--preset llama-3-8b] [--batch 4] [--seq 2048] [--steps 6] [--out DIR]
    python scripts/bench_finetune.py --preset tiny-llama --batch 2 --seq 64 --steps 2   # CPU smoke run

Every configuration runs in a fresh subprocess (so peak-memory counters are separate) on dummy weights of the
preset's shape: LoRA r16 / alpha 32 on all linear layers of attention and MLP, bf16 compute, AdamW, next-token loss
on every token. Tokens/s = batch * seq * timed steps / wall time, after two warm-up steps (compilation).
Peak memory: `memory_stats()["peak_bytes_in_use"]` for JAX, `torch.cuda.max_memory_allocated()` for PEFT.

  jax-lora[-ckpt]   ie_jax Trainer, gradient checkpointing off / on (per layer, nothing saved)
  jax-lora-attn     checkpointing that keeps the attention block's values, recomputes the MLP gate/up GEMMs
  jax-lora-all-mb4  the same batch as 4 micro-batches of one row (gradient accumulation inside the step: the
                    same gradient), keeping every GEMM output the backward pass needs (no GEMM runs twice)
  jax-qlora         NF4 + double-quantized frozen base (made straight into NF4), checkpointing on
  peft-lora[-ckpt]  transformers + peft on the same shapes (sdpa attention), checkpointing off / on
A "-cublas" suffix runs with XLA's Triton GEMM fusions off (every matmul through cuBLAS).
Attention: "auto" is kernels_pallas.ops' own choice (the Pallas flash kernel on Hopper); "cudnn" swaps in
jax.nn.dot_product_attention(implementation="cudnn") for comparison. Results go to --out as JSON, with a table.

`--profile CONFIG` traces a few steps of one configuration (jax.profiler; XLA command buffers off so every kernel
names its HLO instruction) and splits the step's device time into frozen GEMMs, LoRA matmuls, attention, the
chunked cross-entropy, the optimizer, copies, other elementwise work and idle time (see `profile_table`).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


PROFILE_STEPS = 3
DEVICE_PLANE = "/device:GPU"  # the trace plane whose events are kernels
CLASSES = ("frozen GEMMs", "LoRA matmuls", "attention (flash fwd+bwd)", "lm head + cross-entropy", "optimizer",
           "copies / transposes / scan slices", "LoRA elementwise", "norms / rope / SwiGLU / other", "idle")
_SHAPE = re.compile(r"(?:bf16|f32|f16|s8|u8|s32|f8e4m3fn)\[([\d,]*)\]")


def _hlo_instructions(hlo_dir: str) -> dict:
    """Instruction name -> (class, phase, GEMM FLOPs) from XLA's optimized HLO dump of the train step."""
    files = sorted(Path(hlo_dir).glob("*train_step*after_optimizations.txt"), key=lambda f: f.stat().st_size)
    if not files:
        return {}
    parsed, shapes = [], {}
    for line in files[-1].read_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$", line)
        if m:
            parsed.append((line, *m.groups()))
            shapes[m.group(1)] = [[int(d) for d in g.split(",") if d] for g in _SHAPE.findall(m.group(2))]
    out = {}
    for line, name, result, opcode, rest in parsed:
        op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
        target = (re.search(r'custom_call_target="([^"]*)"', line) or [None, ""])[1]
        phase = "recompute" if "rematted_computation" in op_name else "bwd" if "transpose(" in op_name else "fwd"
        operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
        dims = [shapes[o][0] for o in operands if shapes.get(o)]
        res = shapes[name]
        is_gemm = "gemm" in target or "matmul" in target or "__triton_gemm" in line or opcode == "dot" or (
            opcode == "fusion" and "gemm" in name)
        flops = 0.0
        if is_gemm and res and len(dims) >= 2:
            o, a, b = (math.prod(x) for x in (res[0], dims[0], dims[1]))
            flops = 2.0 * o * math.sqrt(a * b / o) if o else 0.0
        if "optimizer" in op_name:
            cls = "optimizer"
        elif "cross_entropy" in op_name:
            cls = "lm head + cross-entropy"
        elif "mosaic" in target.lower() or "pallas" in op_name:
            cls = "attention (flash fwd+bwd)"
        elif is_gemm:
            small = any(16 in d for d in dims[:2] + res[:1])
            cls = "LoRA matmuls" if ("lora" in op_name or small) else "frozen GEMMs"
        elif opcode in ("copy", "transpose", "dynamic-update-slice", "dynamic-slice", "slice", "concatenate") or \
                any(k in name for k in ("copy", "transpose", "dynamic_update_slice", "dynamic-update-slice",
                                         "dynamic_slice", "slice_fusion")):
            cls = "copies / transposes / scan slices"
        elif "lora" in op_name:
            cls = "LoRA elementwise"
        else:
            cls = "norms / rope / SwiGLU / other"
        out[name] = (cls, phase, flops)
    return out


def profile_table(trace_dir: str, hlo_dir: str, steps: int) -> dict:
    """Split the traced steps' device time by kernel class (per step); prints the table and a top-kernel list."""
    from jax.profiler import ProfileData
    instrs = _hlo_instructions(hlo_dir)
    events = []
    for f in Path(trace_dir).rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(f)).planes:
            if not plane.name.startswith(DEVICE_PLANE):
                continue
            lines = [ln for ln in plane.lines if ln.name.startswith("Stream")] or list(plane.lines)
            for ln in lines:
                for ev in ln.events:
                    stats = dict(ev.stats)
                    events.append((ev.name, float(ev.start_ns), float(ev.duration_ns), stats.get("hlo_op"),
                                   str(stats.get("hlo_module", ""))))
    if not events:
        return {"error": "no device events in the trace"}
    span = max(s + d for _, s, d, _, _ in events) - min(s for _, s, _, _, _ in events)
    phases = ("fwd", "recompute", "bwd")
    by_class = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0])  # ns fwd / recompute / bwd, FLOPs, kernels
    by_kernel = collections.defaultdict(lambda: [0.0, 0, ""])
    unmatched = 0
    for kname, _, dur, op, _ in events:
        cls, phase, flops = instrs.get(op, (None, "fwd", 0.0))
        if cls is None:
            unmatched += 1
            low = kname.lower()
            cls = ("copies / transposes / scan slices" if "memcpy" in low or "copy" in low else
                   "frozen GEMMs" if "gemm" in low or "nvjet" in low or "xmma" in low else
                   "norms / rope / SwiGLU / other")
        row = by_class[cls]
        row[phases.index(phase)] += dur
        row[3] += flops
        row[4] += 1
        k = by_kernel[kname[:90]]
        k[0] += dur
        k[1] += 1
        k[2] = cls
    busy = sum(sum(r[:3]) for r in by_class.values())
    step_ms = span / steps / 1e6
    table = []
    for cls in CLASSES:
        if cls == "idle":
            ms = max(span - busy, 0.0) / steps / 1e6
            table.append({"class": cls, "ms": ms, "pct": 100 * ms / step_ms})
            continue
        *ns, flops, n = by_class.get(cls, [0.0, 0.0, 0.0, 0.0, 0])
        ms = sum(ns) / steps / 1e6
        table.append({"class": cls, "ms": ms, **{f"{p}_ms": t / steps / 1e6 for p, t in zip(phases, ns)},
                      "pct": 100 * ms / step_ms, "kernels": n // steps,
                      "tflops": flops / sum(ns) / 1e3 if flops and sum(ns) else None})
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:30]
    print(f"\nprofile: {step_ms:.1f} ms/step of device span, {len(events) // steps} kernels/step, "
          f"{unmatched // steps} without an HLO match")
    print(f"{'class':<36} {'ms':>8} {'fwd':>8} {'recomp':>8} {'bwd':>8} {'%':>6} {'TFLOP/s':>8}")
    for r in table:
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        print(f"{r['class']:<36} {r['ms']:8.1f} {r.get('fwd_ms', 0):8.1f} {r.get('recompute_ms', 0):8.1f} "
              f"{r.get('bwd_ms', 0):8.1f} "
              f"{r['pct']:6.1f} {tf:>8}")
    print(f"\n{'ms/step':>8} {'count':>6}  kernel (class)")
    for name, (t, n, cls) in top:
        print(f"{t / steps / 1e6:8.2f} {n // steps:6d}  {name} ({cls})")
    return {"step_ms": step_ms, "classes": table, "unmatched_per_step": unmatched // steps,
            "top_kernels": [{"name": n, "ms_per_step": t / steps / 1e6, "count": c // steps, "class": cls}
                            for n, (t, c, cls) in top]}


def jax_worker(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from finetune.lora import LoraConfig, apply_lora
    from finetune.qlora import init_nf4_model
    from finetune.trainer import TrainConfig, Trainer
    from ie_jax.presets import get_preset
    from ie_jax.weights import init_model
    from kernels_pallas import ops

    if args.attention == "cudnn":
        def cudnn_attention(q, k, v, *, causal=True, q_segment_ids=None, scale=None, **kw):
            assert q_segment_ids is None and not any(v is not None for v in kw.values() if v is not False)
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
        ops.attention = cudnn_attention
    cfg = get_preset(args.preset)
    if args.method == "qlora":
        model = init_nf4_model(cfg, dtype=jnp.bfloat16, seed=0)
    else:
        model = init_model(cfg, dtype=jnp.bfloat16, seed=0)
    apply_lora(model, LoraConfig(r=16, alpha=32))
    trainer = Trainer(model, TrainConfig(method=args.method, max_steps=1000, learning_rate=1e-5,
                                         gradient_checkpointing=args.ckpt, remat_policy=args.remat_policy))
    del model
    B, T, A = args.batch, args.seq, args.micro
    rng = np.random.default_rng(0)

    def batch():  # [A, B / A, T]: A micro-batches, accumulated inside one step
        ids = rng.integers(0, cfg.vocab_size, (A, B // A, T + 1)).astype(np.int32)
        shape = (A, B // A, T)
        return {"inputs": ids[..., :-1], "targets": ids[..., 1:], "weights": np.ones(shape, np.float32),
                "segment_ids": np.ones(shape, np.int32), "positions": np.broadcast_to(np.arange(T), shape)
                .astype(np.int32)}

    batches = [batch() for _ in range(2)]
    t0 = time.perf_counter()
    for i in range(2):
        loss = float(trainer.train_step(batches[i % 2])["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        metrics = trainer.train_step(batches[i % 2])
    loss = float(metrics["loss"])
    elapsed = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    out = {"tokens_per_sec": B * T * args.steps / elapsed, "step_ms": 1000 * elapsed / args.steps,
           "peak_gib": stats.get("peak_bytes_in_use", 0) / GIB, "loss": loss, "warmup_s": compile_s,
           "device": str(jax.devices()[0].device_kind)}
    if args.profile_dir:
        import tempfile
        trace_dir = tempfile.mkdtemp()
        jax.block_until_ready(trainer.train_step(batches[0]))
        with jax.profiler.trace(trace_dir):
            for i in range(PROFILE_STEPS):
                metrics = trainer.train_step(batches[i % 2])
            jax.block_until_ready(metrics)
        out["profile"] = profile_table(trace_dir, args.profile_dir, PROFILE_STEPS)
    return out


def peft_worker(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    c = json.loads(args.hf_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(**c, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    for p in model.parameters():  # f32 master LoRA weights, as in our trainer
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    B, T = args.batch, args.seq
    ids = torch.randint(0, c["vocab_size"], (B, T), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else 0.0
    return {"tokens_per_sec": B * T * args.steps / elapsed, "step_ms": 1000 * elapsed / args.steps,
            "peak_gib": peak, "loss": float(loss), "warmup_s": warm,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def hf_config(preset: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from ie_jax.presets import get_preset
    cfg = get_preset(preset)
    hf = cfg.to_hf()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    out = {k: hf[k] for k in keep if k in hf}
    out["rope_theta"] = cfg.rope_theta
    return out


CUBLAS_ONLY = "--xla_gpu_enable_triton_gemm=false"
NO_DOT_MERGER = "--xla_gpu_dot_merger_threshold_mb=0"  # no per-step concatenation of q/k/v and gate/up weights


def _cfg(framework, method, ckpt, attention="auto", batch=None, policy="nothing", micro=1, xla_flags=""):
    return dict(framework=framework, method=method, ckpt=ckpt, attention=attention, batch=batch, policy=policy,
                micro=micro, xla_flags=xla_flags)


CONFIGS = {
    "jax-lora-attn": _cfg("jax", "lora", True, policy="save_attention"),
    "jax-lora-all-mb4": _cfg("jax", "lora", True, policy="save_all", micro=4),
    "jax-lora-all-mb2": _cfg("jax", "lora", True, policy="save_all", micro=2),
    "jax-lora-attn-mb2": _cfg("jax", "lora", True, policy="save_attention", micro=2),
    "jax-lora-all-mb2-nomerge": _cfg("jax", "lora", True, policy="save_all", micro=2, xla_flags=NO_DOT_MERGER),
    "jax-lora-attn-nomerge": _cfg("jax", "lora", True, policy="save_attention", xla_flags=NO_DOT_MERGER),
    "jax-lora-attn-cublas": _cfg("jax", "lora", True, policy="save_attention", xla_flags=CUBLAS_ONLY),
    "jax-lora-all-mb4-cublas": _cfg("jax", "lora", True, policy="save_all", micro=4, xla_flags=CUBLAS_ONLY),
    "jax-lora-ckpt-saveproj": _cfg("jax", "lora", True, policy="save_projections"),
    "jax-lora-ckpt": _cfg("jax", "lora", True),
    "jax-lora-ckpt-cudnn": _cfg("jax", "lora", True, "cudnn"),
    "jax-lora": _cfg("jax", "lora", False),
    "jax-lora-cudnn": _cfg("jax", "lora", False, "cudnn"),
    "jax-qlora": _cfg("jax", "qlora", True, batch=1),
    "jax-qlora-attn": _cfg("jax", "qlora", True, batch=1, policy="save_attention"),
    "jax-qlora-all": _cfg("jax", "qlora", True, batch=1, policy="save_all"),
    "jax-qlora-cudnn": _cfg("jax", "qlora", True, "cudnn", batch=1),
    "peft-lora": _cfg("torch", "lora", False, "sdpa"),
    "peft-lora-ckpt": _cfg("torch", "lora", True, "sdpa"),
}


def run_all(args) -> list[dict]:
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    hf = json.dumps(hf_config(args.preset))
    results = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:  # (may grow: see the cuDNN fallback below)
        c = CONFIGS[name]
        b = c["batch"] or args.batch
        python = args.torch_python if c["framework"] == "torch" else sys.executable
        cmd = [python, __file__, "--worker", c["framework"], "--method", c["method"], "--attention", c["attention"],
               "--preset", args.preset, "--batch", str(b), "--seq", str(args.seq), "--steps", str(args.steps),
               "--hf-config", hf, "--remat-policy", c["policy"], "--micro", str(c["micro"])]
        cmd += ["--ckpt"] if c["ckpt"] else []
        hlo_dir = Path(args.hlo_dir or out / "hlo")
        env = dict(os.environ)
        flags = [c["xla_flags"]] if c["xla_flags"] else []
        if name == args.profile:
            cmd += ["--profile-dir", str(hlo_dir)]
            flags.append("--xla_gpu_enable_command_buffer= --xla_dump_hlo_as_text "
                         f"--xla_dump_to={hlo_dir} --xla_dump_hlo_module_re=.*train_step.*")
        if flags:
            env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", "")] + flags).strip()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"error": (proc.stderr or proc.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {args.timeout}s"}
        row.update(config=name, framework=c["framework"], method=c["method"], gradient_checkpointing=c["ckpt"],
                   remat_policy=c["policy"], micro_batches=c["micro"], xla_flags=c["xla_flags"],
                   attention=c["attention"], batch=b, seq=args.seq, wall_s=time.perf_counter() - t0)
        results.append(row)
        print(_row(row), flush=True)
        twin = f"{name}-cudnn" if not name.endswith("-cudnn") else None
        if "error" in row and c["attention"] == "auto" and args.fallback_cudnn and twin in CONFIGS and twin not in names:
            names.append(twin)  # the flash kernel failed here: measure the cuDNN twin instead
        (out / f"finetune_{args.preset}.json").write_text(json.dumps(
            {"preset": args.preset, "lora": {"r": 16, "alpha": 32, "targets": "all-linear"}, "results": results},
            indent=2))
    _table(results)
    return results


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['config']:<22} ERROR {r['error'][-300:]!r}"
    return (f"{r['config']:<22} b{r['batch']}x{r['seq']:<5} {r['tokens_per_sec']:>9,.0f} tok/s "
            f"{r['peak_gib']:>7.1f} GiB  {r['step_ms']:>8.1f} ms/step  loss {r['loss']:.3f}")


def _table(results):
    base = {r["gradient_checkpointing"]: r for r in results if r["framework"] == "torch" and "error" not in r}
    print("\nconfig                 tok/s      peak GiB   vs PEFT (same checkpointing)")
    for r in results:
        if "error" in r:
            print(f"{r['config']:<22} error")
            continue
        ref = base.get(r["gradient_checkpointing"])
        ratio = f"{r['tokens_per_sec'] / ref['tokens_per_sec']:.2f}x" if ref and r["method"] != "qlora" else "-"
        print(f"{r['config']:<22} {r['tokens_per_sec']:>9,.0f}  {r['peak_gib']:>8.1f}   {ratio}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--configs", help=f"comma list of {list(CONFIGS)} (default: all)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    p.add_argument("--torch-python", default=sys.executable, help="interpreter with torch + transformers + peft")
    p.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    p.add_argument("--fallback-cudnn", action="store_true", help="when an 'auto' attention run fails, run its "
                                                                  "cuDNN twin")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    p.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--remat-policy", default="nothing", help=argparse.SUPPRESS)
    p.add_argument("--micro", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--profile-dir", help=argparse.SUPPRESS)
    p.add_argument("--hlo-dir", help="where the profiled configuration's HLO is dumped (default OUT/hlo)")
    p.add_argument("--profile", help="a configuration to trace and split by kernel class (see profile_table)")
    p.add_argument("--hf-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = jax_worker(args) if args.worker == "jax" else peft_worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    run_all(args)


if __name__ == "__main__":
    main()
