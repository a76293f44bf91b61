"""Perplexity of a model on a text file, optionally after quantizing it on the fly, to compare weight formats.

    python scripts/eval_ppl.py --model /path/to/hf_dir --data wiki.test.txt
    python scripts/eval_ppl.py --model /path/to/hf_dir --data wiki.test.txt --quantization awq --json awq.json
    python scripts/eval_ppl.py --model /path/to/awq_checkpoint --data wiki.test.txt       # a quantized checkpoint

The text is tokenized once (no special tokens) and cut into windows of --seq-len tokens. By default windows do not
overlap and each scores its tokens after the first. With --stride S < seq-len, windows advance by S tokens and each
scores only the tokens no earlier window scored, so every token (after the first) is predicted with at least
seq-len - S tokens of context. ppl = exp(mean negative log-likelihood per scored token).

--quantization awq calibrates on a held-out slice at the end of --data (those tokens are not evaluated), or on
--calib when given; the report says which tokens.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import ie_jax  # noqa: E402
from ie_jax.quant import quantize_model  # noqa: E402
from ie_jax.quant.awq import AWQConfig, awq_calibrate, calibration_rows  # noqa: E402

QUANTIZATIONS = ("none", "int8", "int4-rtn", "awq", "fp8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (float or quantized) or preset name")
    p.add_argument("--data", required=True, help="a UTF-8 text file")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="quantize a float model first")
    p.add_argument("--group-size", type=int, default=128, help="int4: input rows per group")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: --seq-len)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--calib", help="awq: calibration text file (default: a held-out slice at the end of --data)")
    p.add_argument("--calib-samples", type=int, default=32, help="awq: calibration rows")
    p.add_argument("--calib-seq-len", type=int, default=512, help="awq: tokens per calibration row")
    p.add_argument("--dtype", default="auto", help="model dtype (auto: the checkpoint's)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="also write the result here as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("group_size", "seq_len", "batch_size", "calib_samples", "calib_seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.seq_len < 2:
        p.error(f"--seq-len={args.seq_len} must be >= 2 (a window predicts its tokens after the first)")
    if args.stride is not None and not 1 <= args.stride <= args.seq_len:
        p.error(f"--stride={args.stride} must be in [1, --seq-len={args.seq_len}]")
    if args.max_tokens is not None and args.max_tokens < 2:
        p.error(f"--max-tokens={args.max_tokens} must be >= 2")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data} is not a file")
    if args.calib is not None and not Path(args.calib).is_file():
        p.error(f"--calib {args.calib} is not a file")
    return args


def windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: tokens [begin, end) go in, and the targets at global positions
    [first_scored, end) are scored. No position is scored twice. With stride < seq_len every position after the
    first is scored; with stride == seq_len a window's first token is context only."""
    out, scored_to = [], 1
    begin = 0
    while scored_to < num_tokens:
        end = min(begin + seq_len, num_tokens)
        out.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        begin += stride
    return out


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(graphdef, state, ids, target_mask):
    """ids [B, S], target_mask [B, S] (position j scores token j) -> (sum of -log p, number of scored tokens)."""
    logits, _ = nnx.merge(graphdef, state)(ids)  # [B, S, V]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # predicts tokens 1..S-1
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [B, S-1]
    mask = target_mask[:, 1:]
    return jnp.sum(nll * mask), jnp.sum(mask)


def perplexity(model, token_ids, seq_len: int, stride: int | None = None, batch_size: int = 8,
               progress: bool = True) -> dict:
    """{"tokens": scored tokens, "nll": mean -log p, "ppl": exp(nll)} of token_ids [N] (see module docstring)."""
    ids = np.asarray(token_ids, np.int32)
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score; got shape {ids.shape}")
    spans = windows(len(ids), seq_len, stride or seq_len)
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0
    for b in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch", disable=not progress,
                  leave=False):
        batch = spans[b:b + batch_size]
        rows = np.zeros((batch_size, seq_len), np.int32)  # short final windows and batches are padded and masked
        mask = np.zeros((batch_size, seq_len), np.float32)
        for r, (begin, end, first) in enumerate(batch):
            rows[r, :end - begin] = ids[begin:end]
            mask[r, first - begin:end - begin] = 1.0
        s, n = _window_nll(graphdef, state, jnp.asarray(rows), jnp.asarray(mask))
        total += float(s)
        count += int(n)
    return {"tokens": count, "nll": total / count, "ppl": math.exp(total / count)}


def quantize_for_eval(model, tokenizer, token_ids, args, log=print):
    """Quantize the float model as --quantization asks; returns (model, ids to evaluate, calibration report)."""
    if args.quantization == "none":
        return model, token_ids, None
    if model.config.quantization is not None:
        raise ValueError(f"{args.model} is already quantized ({model.config.quantization.method}); use "
                         f"--quantization none")
    calib = None
    if args.quantization == "awq":
        seq = min(args.calib_seq_len, model.config.max_position_embeddings)
        if args.calib is not None:
            calib_ids = tokenizer.encode(Path(args.calib).read_text(encoding="utf-8"), add_special_tokens=False)
            rows = calibration_rows(calib_ids, args.calib_samples, seq)
            calib = {"source": args.calib}
        else:  # hold out the end of --data: at most a quarter of it
            held_out = min(args.calib_samples * seq, len(token_ids) // 4)
            seq = min(seq, held_out)
            if seq < 2:
                raise ValueError(f"--data has {len(token_ids)} tokens, too few to hold out a calibration slice; "
                                 f"pass --calib FILE")
            start = len(token_ids) - held_out
            rows = calibration_rows(token_ids[start:], args.calib_samples, seq)
            token_ids = token_ids[:start]
            calib = {"source": f"{args.data} tokens [{start}, {start + held_out}) (not evaluated)"}
        calib.update(rows=rows.shape[0], seq_len=rows.shape[1])
        log(f"AWQ: calibrating on {calib['rows']} rows x {calib['seq_len']} tokens of {calib['source']}")
        model, found = awq_calibrate(model, rows, AWQConfig(group_size=args.group_size), progress=not args.quiet)
        calib["alphas"] = {g: round(float(a.mean()), 3) for g, a in found.alphas.items()}
    quantize_model(model, args.quantization, group_size=args.group_size)
    return model, token_ids, calib


def evaluate(args, log=print) -> dict:
    """Load, tokenize, (quantize,) score; prints one line and returns the result dict (also --json)."""
    start = time.perf_counter()
    model, tokenizer = ie_jax.load_model(args.model, dtype=args.dtype, load_format=args.load_format,
                                         seed=args.seed, progress=not args.quiet)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; perplexity needs the model's tokenizer")
    dtype = str(jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype)  # what "auto" resolved to, before quantizing
    text = Path(args.data).read_text(encoding="utf-8")
    token_ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
    model, token_ids, calib = quantize_for_eval(model, tokenizer, token_ids, args, log)
    if args.max_tokens is not None:
        token_ids = token_ids[:args.max_tokens]
    result = perplexity(model, token_ids, args.seq_len, args.stride, args.batch_size, progress=not args.quiet)
    result.update(model=args.model, quantization=args.quantization, dtype=dtype, data=args.data, seq_len=args.seq_len,
                  stride=args.stride or args.seq_len, calibration=calib,
                  seconds=round(time.perf_counter() - start, 2))
    log(f"{args.model} [{args.quantization}] on {args.data}: {result['tokens']} tokens, ppl {result['ppl']:.4f} "
        f"(nll {result['nll']:.4f})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        evaluate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval_ppl.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
