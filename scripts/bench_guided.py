"""How long structured outputs take to prepare: for each spec, the regex -> DFA compile and the token guide's first
states over the vocabulary (what the first request with a new schema waits for; later ones hit the engine's
cache), and the cost of a state computed when a request first reaches it. Host only (numpy), so it runs anywhere.

    python scripts/bench_guided.py --bpe-vocab 128000          # a byte-level BPE trained here, Llama-3 sized
    python scripts/bench_guided.py --tokenizer /path/to/hf_dir  # a checkpoint's tokenizer
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ie_jax.guided import GuidedDecodingParams, TokenGuide, Vocabulary, token_bytes  # noqa: E402
from ie_jax.regex_dfa import compile_regex  # noqa: E402
from ie_jax.tokenizer import load_tokenizer  # noqa: E402
from profile_host import current_commit, train_bpe, write_json  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 32}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                      "pattern": "[0-9]{5}"}}},
    "active": {"type": "boolean"}, "score": {"type": "number"}}}
SPECS = {
    "choice (3 words)": GuidedDecodingParams(choice=["positive", "negative", "neutral"]),
    "regex (ISO date)": GuidedDecodingParams(regex=r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    "json schema (7 fields, nested, none required)": GuidedDecodingParams(json=SCHEMA),
    "json schema (7 fields, nested, all required)": GuidedDecodingParams(
        json={**SCHEMA, "required": list(SCHEMA["properties"])}),
    "json_object (any, depth 2)": GuidedDecodingParams(json_object=True),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="an HF tokenizer directory (tokenizer.json)")
    ap.add_argument("--bpe-vocab", type=int, default=32000, help="else: train a byte-level BPE of this size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON path or folder (default: $OUT or benchmarks/results/)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_bpe(args.bpe_vocab)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vocab = Vocabulary(token_bytes(tok, tok.vocab_size))
    vocab_s = time.perf_counter() - t0
    rows = []
    for name, spec in SPECS.items():
        best = None
        for _ in range(args.repeats):
            compile_regex.cache_clear()
            t0 = time.perf_counter()
            dfa = compile_regex(spec.regex_pattern())
            t1 = time.perf_counter()
            guide = TokenGuide(dfa, vocab, tok.eos_token_ids)
            t2 = time.perf_counter()
            later = [s for s in range(dfa.delta.shape[0]) if s not in guide.rows][:20]  # computed when reached
            t3 = time.perf_counter()
            for state in later:
                guide.mask(state)
            lazy_ms = 1e3 * (time.perf_counter() - t3) / max(len(later), 1)
            if best is None or t2 - t0 < best["total_s"]:
                best = dict(spec=name, dfa_states=int(dfa.delta.shape[0]), eager_states=len(guide.rows) - len(later),
                            dfa_s=t1 - t0, guide_s=t2 - t1, total_s=t2 - t0, lazy_state_ms=lazy_ms if later else None,
                            mask_kb=guide.mask(0).nbytes / 1024)
        rows.append(best)
        lazy = f"{best['lazy_state_ms']:5.2f} ms" if best["lazy_state_ms"] else "   none"
        print(f"{name:34s} DFA {best['dfa_states']:4d} states {best['dfa_s'] * 1e3:7.1f} ms | guide "
              f"{best['eager_states']:4d} states up front {best['guide_s'] * 1e3:7.1f} ms | a later state {lazy}")
    res = dict(bench="guided", tokenizer=args.tokenizer or f"byte-level BPE trained here, {args.bpe_vocab}",
               vocab_size=tok.vocab_size, tokenizer_s=train_s, token_bytes_s=vocab_s, rows=rows,
               commit=current_commit(), date=time.strftime("%Y-%m-%d %H:%M"), machine=os.uname().nodename)
    print(f"vocabulary {tok.vocab_size}: token bytes {vocab_s:.2f} s")
    write_json(res, args.out, f"guided_{tok.vocab_size}")


if __name__ == "__main__":
    main()
