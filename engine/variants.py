"""The step's sampler variants: which compiled executable of a bucket serves a step, chosen from its rows'
SamplingParams (engine/runner.py compiles them, engine/llm_engine.py picks one per step)."""
from __future__ import annotations

# The step's sampler variants, each one executable per bucket: name -> (sampler mode, logprobs). "full" serves any
# step and every bucket has it. Decode-sized buckets can also have the cheaper ones, each for the steps whose rows
# allow it (`step_variant`); they give the same tokens as "full" on those steps. On one H100 at 256 rows and a
# 152k vocabulary, the sort behind top-k / top-p took 3.1 ms of a 4.4 ms sampler; on the H200 the top-20 logprobs
# that "full" computes took 1.7 ms of a 12.4 ms 8B decode step.
#   full    the sort and the top-`max_logprobs` logprobs: whatever the rows ask
#   greedy  every row greedy, none asking for logprobs, a penalty or min_tokens: the raw logits' argmax only
#   sort    no row asking for logprobs: top-k / top-p / min-p / temperature draws, no log-softmax or top-k logprobs
#   draw    as sort, and no sampled row asking for top-k or top-p: no sort of the vocabulary either
VARIANTS = ("full", "greedy", "sort", "draw")
FALLBACK = {"greedy": "full", "sort": "full", "draw": "sort"}  # a variant not (yet) compiled -> the next one


def _chain(v):
    return (v, *_chain(FALLBACK[v])) if v in FALLBACK else (v,)


CHAIN = {v: _chain(v) for v in VARIANTS}  # each variant and its fallbacks, in order
# Steps whose requests all have one token (decode-only) may also have a twin of their variant, "<variant>/decode",
# compiled with `decode_only`: attention then runs the paged kernel's decode tiles (kernels_pallas/paged_decode.py;
# H200, 256 rows at 192 keys: 56 instead of 72 us per layer), which walk a multi-token request one token per pass
# and so cannot serve a step that holds a prompt chunk. Twins exist for the decode-sized buckets only where the
# kernel runs (a Hopper GPU); they compile with the extra variants (in the background for the server).
DECODE = "/decode"


def row_variant(p, vocab_size: int) -> str:
    """The cheapest variant that serves a row with these SamplingParams (computed once per request). "greedy" is
    the raw logits' argmax (sampler mode "argmax"), so a greedy row with a penalty or min_tokens takes "draw",
    whose greedy rows take the argmax of the penalised logits (logit bias included). A row whose tokens are masked
    (guided decoding, allowed_token_ids) takes "full", the one variant that applies the masks."""
    if p.logprobs is not None or p.masked:
        return "full"
    if p.greedy and not (p.penalised or p.min_tokens or p.biased):
        return "greedy"
    return "sort" if 0 < p.top_k < vocab_size or p.top_p < 1 else "draw"


_COST = {"greedy": 0, "draw": 1, "sort": 2, "full": 3}


def step_variant(row_variants) -> str:
    """The cheapest variant that serves every row of a step: the costliest of its rows' variants."""
    return max(row_variants, key=_COST.__getitem__)
