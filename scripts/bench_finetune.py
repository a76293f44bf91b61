"""Fine-tuning throughput and peak memory on one GPU: ie_jax LoRA / QLoRA against HF PEFT, in one job.

    python scripts/bench_finetune.py [--preset llama-3-8b] [--batch 4] [--seq 2048] [--steps 6] [--out DIR]
    python scripts/bench_finetune.py --preset tiny-llama --batch 2 --seq 64 --steps 2   # CPU smoke run

Every configuration runs in a fresh subprocess (so peak-memory counters are separate) on dummy weights of the
preset's shape: LoRA r16 / alpha 32 on all linear layers of attention and MLP, bf16 compute, AdamW, next-token loss
on every token. Tokens/s = batch * seq * timed steps / wall time, after two warm-up steps (compilation).
Peak memory: `memory_stats()["peak_bytes_in_use"]` for JAX, `torch.cuda.max_memory_allocated()` for PEFT.

  jax-lora[-ckpt]   ie_jax Trainer, gradient checkpointing off / on (per layer)
  jax-qlora         NF4 + double-quantized frozen base (made straight into NF4), checkpointing on
  peft-lora[-ckpt]  transformers + peft on the same shapes (sdpa attention), checkpointing off / on
Attention: "auto" is kernels_pallas.ops' own choice (the Pallas flash kernel on Hopper); "cudnn" swaps in
jax.nn.dot_product_attention(implementation="cudnn") for comparison. Results go to --out as JSON, with a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


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
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)

    def batch():
        ids = rng.integers(0, cfg.vocab_size, (1, B, T + 1)).astype(np.int32)
        return {"inputs": ids[..., :-1], "targets": ids[..., 1:], "weights": np.ones((1, B, T), np.float32),
                "segment_ids": np.ones((1, B, T), np.int32), "positions": np.broadcast_to(np.arange(T), (1, B, T))
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
    return {"tokens_per_sec": B * T * args.steps / elapsed, "step_ms": 1000 * elapsed / args.steps,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / GIB, "loss": loss, "warmup_s": compile_s,
            "device": str(jax.devices()[0].device_kind)}


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


CONFIGS = {  # name: (framework, method, gradient checkpointing, attention, batch override[, remat policy])
    "jax-lora-ckpt-saveproj": ("jax", "lora", True, "auto", None, "save_projections"),
    "jax-qlora-saveproj": ("jax", "qlora", True, "auto", 1, "save_projections"),
    "jax-lora-ckpt": ("jax", "lora", True, "auto", None),
    "jax-lora-ckpt-cudnn": ("jax", "lora", True, "cudnn", None),
    "jax-lora-cudnn": ("jax", "lora", False, "cudnn", None),
    "jax-lora": ("jax", "lora", False, "auto", None),
    "jax-qlora": ("jax", "qlora", True, "auto", 1),
    "jax-qlora-cudnn": ("jax", "qlora", True, "cudnn", 1),
    "peft-lora": ("torch", "lora", False, "sdpa", None),
    "peft-lora-ckpt": ("torch", "lora", True, "sdpa", None),
}


def run_all(args) -> list[dict]:
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    hf = json.dumps(hf_config(args.preset))
    results = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:  # (may grow: see the cuDNN fallback below)
        framework, method, ckpt, attention, batch, *policy = CONFIGS[name]
        b = batch or args.batch
        python = args.torch_python if framework == "torch" else sys.executable
        cmd = [python, __file__, "--worker", framework, "--method", method, "--attention", attention,
               "--preset", args.preset, "--batch", str(b), "--seq", str(args.seq), "--steps", str(args.steps),
               "--hf-config", hf, "--remat-policy", (policy or ["nothing"])[0]] + (["--ckpt"] if ckpt else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"error": (proc.stderr or proc.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {args.timeout}s"}
        row.update(config=name, framework=framework, method=method, gradient_checkpointing=ckpt,
                   remat_policy=(policy or ["nothing"])[0],
                   attention=attention, batch=b, seq=args.seq, wall_s=time.perf_counter() - t0)
        results.append(row)
        print(_row(row), flush=True)
        twin = f"{name}-cudnn" if not name.endswith("-cudnn") else None
        if "error" in row and attention == "auto" and args.fallback_cudnn and twin in CONFIGS and twin not in names:
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
    p.add_argument("--hf-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = jax_worker(args) if args.worker == "jax" else peft_worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    run_all(args)


if __name__ == "__main__":
    main()
