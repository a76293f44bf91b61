"""Fine-tune an ie_jax model: LoRA, QLoRA, DPO (on LoRA) or full fine-tuning / training from scratch.

    python scripts/finetune_lora.py                       # offline demo: embedded default model + bundled data
    python scripts/finetune_lora.py --model PATH|preset --data train.jsonl [--eval-data eval.jsonl] \
        --method {lora,qlora,dpo,full} --output DIR [--r 16 --alpha 32 --lr 2e-4 --epochs N | --steps N \
        --batch-size 8 --seq-len 512 --grad-accum 1 --packing --resume --merge]
    python scripts/finetune_lora.py --method full --from-scratch --preset gpt2-small-ish --data input.txt

Writes OUTPUT/adapter/ (PEFT format) for adapter methods, OUTPUT/model/ (HF checkpoint) for full, OUTPUT/merged/
with --merge, plus OUTPUT/metrics.jsonl, OUTPUT/loss.png and OUTPUT/checkpoints/ (orbax; --resume continues).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ie_jax  # noqa: E402
from finetune import data as D  # noqa: E402
from finetune.export import load_peft_adapter, save_merged, save_peft_adapter, save_tokenizer  # noqa: E402
from finetune.forward import REMAT_POLICIES  # noqa: E402
from finetune.formats import SFTExample, load_preference, load_sft  # noqa: E402
from finetune.lora import LoraConfig, apply_lora  # noqa: E402
from finetune.loop import LoopConfig, fit  # noqa: E402
from finetune.losses import DPOConfig  # noqa: E402
from finetune.qlora import quantize_base  # noqa: E402
from finetune.trainer import TrainConfig, Trainer  # noqa: E402
from ie_jax.sharding import make_mesh  # noqa: E402
from ie_jax.weights import save_hf_checkpoint  # noqa: E402

SAMPLE_SFT = ROOT / "finetune" / "data" / "sample_sft.jsonl"
SAMPLE_DPO = ROOT / "finetune" / "data" / "sample_dpo.jsonl"


# The names transformers' TrainingArguments, TRL and PEFT give the same settings: each is accepted too, in either
# spelling (--learning_rate or --learning-rate), as HfArgumentParser accepts them.
HF_NAMES = {
    "--model": ["model_name_or_path"], "--data": ["train_file"], "--output": ["output_dir"],
    "--r": ["lora_r"], "--alpha": ["lora_alpha"], "--dropout": ["lora_dropout"],
    "--target-modules": ["lora_target_modules"], "--lr": ["learning_rate"], "--lr-schedule": ["lr_scheduler_type"],
    "--epochs": ["num_train_epochs"], "--batch-size": ["per_device_train_batch_size"],
    "--grad-accum": ["gradient_accumulation_steps"], "--seq-len": ["max_seq_length", "max_length"],
    "--log-every": ["logging_steps"], "--eval-every": ["eval_steps"], "--save-every": ["save_steps"],
}


class _Parser(argparse.ArgumentParser):
    def add_argument(self, *names, **kwargs):
        """Each --dashed-flag also as --dashed_flag, plus its HF_NAMES (hidden from --help's option list)."""
        extra = [n.replace("-", "_").replace("__", "--", 1) for n in names if n.startswith("--") and "-" in n[2:]]
        for n in names:
            extra += [f"--{h}" for h in HF_NAMES.get(n, [])] + [f"--{h.replace('_', '-')}"
                                                               for h in HF_NAMES.get(n, [])]
        action = super().add_argument(*names, **kwargs)
        if extra:
            super().add_argument(*dict.fromkeys(extra), **{**kwargs, "dest": action.dest, "help": argparse.SUPPRESS})
        return action


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="HF checkpoint directory or preset (default: embedded model)")
    p.add_argument("--preset", help="with --from-scratch: the architecture to build (a preset name)")
    p.add_argument("--from-scratch", action="store_true", help="random initial weights (needs --method full)")
    p.add_argument("--data", help="train JSONL (text / prompt+completion / messages; DPO: prompt+chosen+rejected) "
                                  "or, for language modelling, a .txt file (default: bundled sample)")
    p.add_argument("--eval-data", help="held-out JSONL / .txt; default: --eval-split of the train data")
    p.add_argument("--eval-split", type=float, default=0.05, help="fraction held out when --eval-data is absent")
    p.add_argument("--method", choices=("lora", "qlora", "dpo", "full"), default="lora")
    p.add_argument("--output", default="finetune_output")
    p.add_argument("--dtype", default="auto", help="weights dtype (auto: the checkpoint's; bfloat16 on GPU)")
    # LoRA
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--target-modules", default="all-linear",
                   help="'all-linear', a comma list of module names (q_proj,v_proj), or a regex over HF names")
    p.add_argument("--use-rslora", action="store_true")
    p.add_argument("--adapter", help="start from this PEFT adapter directory instead of a fresh adapter")
    # Optimization
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--epochs", type=int, help="passes over the data (default 1; 3 for the bundled demo data)")
    p.add_argument("--steps", "--max-steps", type=int, dest="steps", help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--loss-on-all-tokens", action="store_true", help="train on prompts / user turns too")
    p.add_argument("--truncation", choices=("truncate", "error"), default="truncate")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--remat-policy", default="nothing", choices=REMAT_POLICIES,
                   help="what each checkpointed layer keeps for the backward pass: nothing (least memory), "
                        "save_attention (recompute only the MLP's gate/up), save_all (recompute no GEMM; pair it "
                        "with --grad-accum to fit), save_projections")
    p.add_argument("--compute-dtype", default="bfloat16", help="full fine-tuning: dtype of the forward pass")
    p.add_argument("--seed", type=int, default=0)
    # DPO
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss-type", choices=("sigmoid", "ipo", "hinge", "robust"), default="sigmoid")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--precompute-ref-log-probs", action="store_true")
    # Mesh, logging, checkpoints, export
    p.add_argument("--mesh-data", type=int, default=None, help="data-parallel (FSDP) size; default: all devices")
    p.add_argument("--mesh-model", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--sharding-rules", choices=("fsdp", "tp"), default="fsdp")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--merge", action="store_true", help="also write OUTPUT/merged/ (adapter folded into the base)")
    p.add_argument("--base-model-name", help="base_model_name_or_path for adapter_config.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.from_scratch and args.method != "full":
        p.error("--from-scratch trains every weight: use it with --method full")
    if args.merge and args.method == "full":
        p.error("--merge applies to adapter methods; --method full already writes OUTPUT/model/")
    if args.epochs is None:
        args.epochs = 1 if args.data else 3
    if not 0 <= args.eval_split < 1:
        p.error(f"--eval-split={args.eval_split} must be in [0, 1)")
    return args


def load(args):
    """The model (with adapters / NF4 base as the method wants), its tokenizer and the LoraConfig (or None)."""
    source = args.preset if args.from_scratch and args.preset else args.model
    dtype = args.dtype
    if dtype == "auto" and jax.default_backend() == "gpu":
        dtype = "bfloat16"
    model, tokenizer = ie_jax.load_model(source, dtype=dtype, load_format="dummy" if args.from_scratch else "auto",
                                         seed=args.seed, progress=not args.no_progress)
    if tokenizer is None:
        raise SystemExit(f"{source} has no tokenizer (tokenizer.json); cannot read text data")
    if args.method == "full":
        return model, tokenizer, None
    if args.method == "qlora":
        quantize_base(model)
    if args.adapter:
        return model, tokenizer, load_peft_adapter(model, args.adapter)
    targets = args.target_modules
    if targets != "all-linear" and ("," in targets or targets.isidentifier()):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    config = LoraConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=targets,
                        use_rslora=args.use_rslora, seed=args.seed)
    apply_lora(model, config)
    return model, tokenizer, config


def text_examples(path, tokenizer, seq_len: int) -> list[SFTExample]:
    """A plain text file as one token stream cut into rows of seq_len + 1 (language modelling, nanoGPT style)."""
    ids = np.asarray(tokenizer.encode(Path(path).read_text(encoding="utf-8"), add_special_tokens=False), np.int32)
    n = seq_len + 1
    return [SFTExample(ids[i:i + n], np.ones(len(ids[i:i + n]), bool), f"{path}:{i}")
            for i in range(0, max(len(ids) - 1, 1), n) if len(ids[i:i + n]) > 1]


def load_examples(path, args, tokenizer):
    if args.method == "dpo":
        return load_preference(path, tokenizer)
    if str(path).endswith(".txt"):
        return text_examples(path, tokenizer, args.seq_len)
    return load_sft(path, tokenizer, completion_only=not args.loss_on_all_tokens)


def datasets(args, tokenizer, trainer_cfg_fn):
    train_path = args.data or (SAMPLE_DPO if args.method == "dpo" else SAMPLE_SFT)
    train = load_examples(train_path, args, tokenizer)
    if args.eval_data:
        held_out = load_examples(args.eval_data, args, tokenizer)
    else:
        order = np.random.default_rng(args.seed).permutation(len(train))
        k = int(round(len(train) * args.eval_split))
        held_out = [train[i] for i in order[:k]]
        train = [train[i] for i in sorted(order[k:])]
    cfg = D.DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       packing=args.packing and args.method != "dpo", seed=args.seed, num_epochs=args.epochs,
                       truncation=args.truncation)
    build = D.preference_dataset if args.method == "dpo" else D.sft_dataset
    kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
    steps = args.steps or D.count_steps(build(train, cfg, **kw))
    if args.steps:
        cfg = dataclasses.replace(cfg, num_epochs=None)  # repeat until --steps
    eval_cfg = dataclasses.replace(cfg, shuffle=False, num_epochs=1)
    return train, cfg, (build(held_out, eval_cfg, **kw) if held_out else None), steps, build, kw


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output)
    model, tokenizer, lora_config = load(args)
    train, data_cfg, eval_ds, steps, build, kw = datasets(args, tokenizer, None)
    num_devices = len(jax.devices())
    data_size = args.mesh_data or num_devices // args.mesh_model
    mesh = make_mesh(model=args.mesh_model, data=data_size) if data_size * args.mesh_model > 1 else None
    config = TrainConfig(
        method=args.method, max_steps=steps, learning_rate=args.lr, lr_schedule=args.lr_schedule,
        warmup_steps=min(args.warmup_steps, steps), weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        compute_dtype=args.compute_dtype, gradient_checkpointing=not args.no_gradient_checkpointing,
        remat_policy=args.remat_policy, seed=args.seed,
        dpo=DPOConfig(beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                      precompute_ref_log_probs=args.precompute_ref_log_probs))
    trainer = Trainer(model, config, mesh=mesh, rules=args.sharding_rules)
    extra = None
    if args.method == "dpo" and args.precompute_ref_log_probs:
        extra = precompute_reference(trainer, train, data_cfg, build)
    train_ds = build(train, data_cfg, **kw, **({"extra": extra} if extra else {}))
    print(f"{args.method}: {len(train)} train examples, {steps} steps of {data_cfg.rows_per_step} rows x "
          f"{data_cfg.seq_len} tokens, {num_devices} device(s)" + (f", mesh {dict(mesh.shape)}" if mesh else ""))
    fit(trainer, iter(train_ds), LoopConfig(output_dir=str(out), log_every=args.log_every,
                                            eval_every=args.eval_every, save_every=args.save_every,
                                            resume=args.resume, progress=not args.no_progress),
        eval_data=eval_ds, metadata={"args": vars(args)})
    trained = trainer.model()
    if args.method == "full":
        save_hf_checkpoint(trained, trained.config, out / "model")
        save_tokenizer(tokenizer, out / "model", args.model if Path(args.model).is_dir() else None)
        print(f"wrote {out / 'model'}")
    else:
        base_name = args.base_model_name or str(args.model)
        save_peft_adapter(trained, lora_config, out / "adapter", base_model_name_or_path=base_name)
        print(f"wrote {out / 'adapter'}")
        if args.merge:
            save_merged(trained, out / "merged", tokenizer, source_dir=args.model if Path(args.model).is_dir()
                        else None)
            print(f"wrote {out / 'merged'}")
    (out / "run_config.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")


def precompute_reference(trainer, examples, data_cfg, build) -> dict[str, np.ndarray]:
    """Reference log-probs of every pair, in example order (one pass, adapters off)."""
    cfg = dataclasses.replace(data_cfg, shuffle=False, num_epochs=1)
    chosen, rejected = [], []
    for batch in build(examples, cfg):
        c, r = trainer.reference_logps(batch)
        chosen.append(np.asarray(c).reshape(-1))
        rejected.append(np.asarray(r).reshape(-1))
    n = len(examples)
    return {"ref_chosen_logps": np.concatenate(chosen)[:n], "ref_rejected_logps": np.concatenate(rejected)[:n]}


if __name__ == "__main__":
    main()
