"""Reference generation: the oracle the serving engine must match token for token under greedy decoding.

Prefill writes the whole (padded) prompt batch into a contiguous, preallocated cache [L, B, S_max, K, H] in one
jitted call; a host loop then runs one jitted decode step per token, sampling on device. The host reads back only
the sampled ids (and logprobs when asked) to apply stop rules. `use_cache=False` recomputes the full prefix for
every token instead (a static [B, S_max] buffer, so one compilation): the O(n^2) baseline that the KV cache removes.

Batches are padded on the left (rows right-aligned, one write index for all rows) or on the right (per-row write
indices); both give the same tokens. This module knows nothing of pages or scheduling.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ie_jax.api import forward
from ie_jax.detokenizer import make_detokenizer
from ie_jax.models import ContiguousCache, DenseCausal
from ie_jax.sampling import SamplingParams, SamplingTensors, sample
from ie_jax.stopping import check_stop


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop id or stop string) or "length"
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob} (sampled + top-k)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclasses.dataclass
class GenerateOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    # with SamplingParams.prompt_logprobs: per prompt token, None for the first, else {token_id: logprob} (the
    # prompt token's own and the top k)
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


def generate(model: nnx.Module, tokenizer, prompts: str | Sequence[str] | Sequence[Sequence[int]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_cache: bool = True, padding_side: str = "left") -> list[GenerateOutput]:
    """Generate completions for a batch of prompts (strings or token-id lists). See the module docstring."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"{padding_side=} must be 'left' or 'right'")
    cfg = model.config
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    prompt_ids = [_encode(tokenizer, p, cfg.vocab_size) for p in prompts]
    params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompt_ids)
    params = [SamplingParams() if p is None else p for p in params]
    if any(p.masked for p in params):
        raise ValueError("guided decoding and allowed_token_ids run in the serving engine: use engine.llm.LLM or "
                         "scripts/serve.py")
    if len(params) != len(prompt_ids):
        raise ValueError(f"got {len(params)} sampling params for {len(prompt_ids)} prompts")

    # One row per (prompt, sample): n > 1 repeats the prompt with derived seeds.
    rows = [(i, j) for i, p in enumerate(params) for j in range(p.n)]
    row_params = [dataclasses.replace(params[i], n=1, seed=None if params[i].seed is None else
                                      (params[i].seed + 7919 * j) % 2**32) for i, j in rows]
    row_prompts = [prompt_ids[i] for i, _ in rows]
    max_new = max(p.max_tokens for p in row_params)
    max_prompt = max(map(len, row_prompts))
    total = max_prompt + max_new
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({max_prompt} tokens) + max_tokens ({max_new}) = {total} exceeds the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    eos = list(getattr(tokenizer, "eos_token_ids", ()) or cfg.eos_token_id)
    tensors = SamplingTensors.from_params(row_params, row_prompts, [[] for _ in rows], cfg.vocab_size,
                                          eos_ids=[eos] * len(rows))
    min_tokens = jnp.asarray([p.min_tokens for p in row_params], jnp.int32)
    num_logprobs = max((p.logprobs or 0) for p in row_params)

    graphdef, state = nnx.split(model)
    B, lengths = len(rows), np.array([len(p) for p in row_prompts], np.int32)
    S = _round_up(total, 16)
    tokens = np.zeros((B, S), np.int32)
    start = (max_prompt - lengths) if padding_side == "left" else np.zeros(B, np.int32)
    for b, ids in enumerate(row_prompts):
        tokens[b, start[b]: start[b] + lengths[b]] = ids
    end = start + lengths  # next free slot per row

    if use_cache:
        cache_dtype = jax.tree.leaves(state)[0].dtype
        ctx = ContiguousCache.allocate(cfg.num_layers, B, S, cfg.num_kv_heads, cfg.head_dim, cache_dtype,
                                       start=start)
        out, ctx, tensors = _prefill(graphdef, state, jnp.asarray(tokens[:, :max_prompt]), ctx,
                                     jnp.asarray(end - 1), tensors, min_tokens, num_logprobs)
    else:
        buf = jnp.asarray(tokens)
        out, tensors = _full_step(graphdef, state, buf, jnp.asarray(start), jnp.asarray(end), tensors,
                                  min_tokens, num_logprobs)

    finished = [None] * B
    gen = [[] for _ in range(B)]
    logprobs = [[] if p.logprobs is not None else None for p in row_params]
    detoks = [make_detokenizer(tokenizer, ids, skip_special_tokens=p.skip_special_tokens)
              if tokenizer is not None else None for ids, p in zip(row_prompts, row_params)]
    texts = [""] * B
    for step in range(max_new):
        ids, lp = np.asarray(out.token_ids), np.asarray(out.logprobs)  # the one host sync per step
        top_ids, top_lp = (np.asarray(out.top_ids), np.asarray(out.top_logprobs)) if num_logprobs else (None, None)
        for b in range(B):
            if finished[b] is not None:
                continue
            tok = int(ids[b])
            gen[b].append(tok)
            if logprobs[b] is not None:
                k = row_params[b].logprobs
                entry = {int(i): float(v) for i, v in zip(top_ids[b, :k], top_lp[b, :k])} if k else {}
                entry[tok] = float(lp[b])
                logprobs[b].append(entry)
            new_text = detoks[b].add(tok) if detoks[b] is not None else ""
            stop = check_stop(row_params[b], tok, len(gen[b]), eos, texts[b] + new_text, len(new_text))
            texts[b] += new_text
            if stop is not None:
                if not isinstance(stop.stop_reason, str) and detoks[b] is not None:
                    stop.text += detoks[b].flush()  # a run that ends mid-character still shows what it produced
                texts[b], finished[b] = stop.text, (stop.finish_reason, stop.stop_reason)
        if all(f is not None for f in finished) or step == max_new - 1:
            break
        pos = jnp.asarray(end + step - start)[:, None]
        if use_cache:
            ctx = ctx.replace(write_index=jnp.asarray(end + step))
            out, ctx, tensors = _decode(graphdef, state, out.token_ids[:, None], pos, ctx, tensors, min_tokens,
                                        num_logprobs)
        else:
            buf = buf.at[jnp.arange(B), jnp.asarray(end + step)].set(out.token_ids)
            out, tensors = _full_step(graphdef, state, buf, jnp.asarray(start), jnp.asarray(end + step + 1),
                                      tensors, min_tokens, num_logprobs)

    results = []
    for i, prompt in enumerate(prompts):
        completions = []
        for b, (pi, j) in enumerate(rows):
            if pi != i:
                continue
            reason, stop = finished[b] if finished[b] is not None else ("length", None)
            completions.append(CompletionOutput(j, texts[b], gen[b], reason, logprobs[b], stop))
        k = params[i].prompt_logprobs
        results.append(GenerateOutput(prompt if isinstance(prompt, str) else None, prompt_ids[i], completions,
                                      None if k is None else prompt_logprobs(model, prompt_ids[i], k)))
    return results


def prompt_logprobs(model: nnx.Module, token_ids: Sequence[int], k: int) -> list[TokenLogprobs | None]:
    """Each prompt token's logprob given the tokens before it, with the top k there and its rank (the reference:
    one dense forward over the prompt, log-softmax in f32). The first token has no context: None."""
    logp = np.asarray(jax.nn.log_softmax(forward(model, list(token_ids))[0, :-1], axis=-1))
    return [None] + [prompt_logprob_entry(tok, row[tok], *_top(row, k), rank=int((row >= row[tok]).sum()))
                     for tok, row in zip(token_ids[1:], logp)]


class TokenLogprobs(dict):
    """{token_id: logprob} at one prompt position (the top k, then the token itself), and `rank`: the token's rank
    in the vocabulary there, 1 for the likeliest (how many tokens are at least as likely, vLLM's rule)."""
    __slots__ = ("rank",)

    def __init__(self, items, rank: int | None = None):
        super().__init__(items)
        self.rank = rank


def prompt_logprob_entry(token: int, logprob: float, top_ids, top_logprobs, rank: int | None = None) -> TokenLogprobs:
    """One position's entry, as generated tokens' are: the top k, then the token itself."""
    return TokenLogprobs({**{int(i): float(v) for i, v in zip(top_ids, top_logprobs)}, int(token): float(logprob)},
                         None if rank is None else int(rank))


def _top(row: np.ndarray, k: int):
    ids = np.argsort(-row, kind="stable")[:k]
    return ids, row[ids]


def _encode(tokenizer, prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, str) and tokenizer is None:
        raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _advance(tensors: SamplingTensors, token_ids, min_tokens) -> SamplingTensors:
    """Account for one sampled token per row: output counts, step, and the min_tokens EOS ban."""
    step = tensors.step + 1
    counts = tensors.output_counts.at[jnp.arange(token_ids.shape[0]), token_ids].add(1)
    return tensors.replace(step=step, output_counts=counts, suppress_eos=step < min_tokens)


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(3,))
def _prefill(graphdef, state, tokens, ctx, last, tensors, min_tokens, num_logprobs):
    model = nnx.merge(graphdef, state)
    B, T = tokens.shape
    positions = jnp.arange(T)[None, :] - ctx.start[:, None]
    logits, ctx = model(tokens, positions, ctx)
    out = sample(logits[jnp.arange(B), last], tensors, num_logprobs)
    return out, ctx, _advance(tensors, out.token_ids, min_tokens)


# The cache is donated: each decode step updates it in place instead of copying [L, B, S_max, K, H].
@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(4,))
def _decode(graphdef, state, tokens, positions, ctx, tensors, min_tokens, num_logprobs):
    logits, ctx = nnx.merge(graphdef, state)(tokens, positions, ctx)
    out = sample(logits[:, -1], tensors, num_logprobs)
    return out, ctx, _advance(tensors, out.token_ids, min_tokens)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _full_step(graphdef, state, buf, start, end, tensors, min_tokens, num_logprobs):
    """No cache: run the whole [B, S_max] buffer and sample from each row's last real token."""
    B, S = buf.shape
    idx = jnp.arange(S)[None, :]
    segments = ((idx >= start[:, None]) & (idx < end[:, None])).astype(jnp.int32)
    logits, _ = nnx.merge(graphdef, state)(buf, idx - start[:, None], DenseCausal(segments))
    out = sample(logits[jnp.arange(B), end - 1], tensors, num_logprobs)
    return out, _advance(tensors, out.token_ids, min_tokens)
