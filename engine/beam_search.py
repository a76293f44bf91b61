"""Beam search over the engine, as vLLM runs it (`LLM.beam_search`, the server's `use_beam_search`).

Each round expands every live beam by one token: the beam's tokens go to the engine as a prompt with
`max_tokens=1` and `logprobs=2 * beam_width`, so the engine's prefix cache holds the beams' shared pages and a
round recomputes only each beam's last, partial page. Of all the children (beam + one of its top 2w tokens, the
log-probability added) a child ending in EOS is set aside as finished (unless `ignore_eos`), and the best
`beam_width` of the others by cumulative log-probability stay live. After `max_tokens` rounds, or once no beam is
left, the finished and the live beams are ranked by `cum_logprob / len(tokens) ** length_penalty` (the prompt
counts, a final EOS does not) and the best `beam_width` are returned, best first.

The search is a plain object (`BeamSearch`): `pending()` gives the prompts to run, `advance()` takes their
logprobs. `run` drives it over an `LLMEngine`, `run_async` over an `AsyncLLM`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools

from engine.outputs import RequestOutput
from ie_jax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's BeamSearchParams."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # accepted as vLLM does; beam search has no stop strings

    def __post_init__(self):
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: the prompt's tokens and its own, the logprobs of its own ({token: logprob} of the candidates seen
    at that step, its token included), their sum, and (once returned) its text and why it ended."""
    tokens: list[int]
    logprobs: list[dict[int, float]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first
    num_cached_tokens: int = 0  # run_async: prompt tokens the first round found in the prefix cache


def beam_score(seq: BeamSearchSequence, eos_token_ids: tuple[int, ...], length_penalty: float) -> float:
    n = len(seq.tokens) - (1 if seq.tokens[-1] in eos_token_ids else 0)
    return seq.cum_logprob / (n ** length_penalty)


def round_params(params: BeamSearchParams) -> SamplingParams:
    """What each beam's one-token request of a round runs with: its top 2w candidates' logprobs."""
    return SamplingParams(max_tokens=1, logprobs=2 * params.beam_width, temperature=params.temperature,
                          ignore_eos=True, skip_special_tokens=False)


class BeamSearch:
    """The search for a batch of prompts (token ids each)."""

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: tuple[int, ...]):
        self.params, self.eos = params, tuple(eos_token_ids)
        self.prompt_lens = [len(p) for p in prompts]
        self.live = [[BeamSearchSequence(list(p), [])] for p in prompts]
        self.finished: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.rounds = 0

    @property
    def done(self) -> bool:
        return self.rounds >= self.params.max_tokens or not any(self.live)

    def pending(self) -> list[tuple[tuple[int, int], list[int]]]:
        """((prompt index, beam index), tokens) of every live beam: the prompts of the next round."""
        return [((i, b), beam.tokens) for i, beams in enumerate(self.live) for b, beam in enumerate(beams)]


    def advance(self, logprobs: dict[tuple[int, int], dict[int, float]]) -> None:
        """One round: logprobs[(i, b)] are the top candidates after live beam b of prompt i."""
        w = self.params.beam_width
        for i, beams in enumerate(self.live):
            children = []
            for b, beam in enumerate(beams):
                lps = logprobs[(i, b)]
                for token, lp in lps.items():
                    children.append(BeamSearchSequence(beam.tokens + [token], beam.logprobs + [lps],
                                                       beam.cum_logprob + lp))
            kept = []
            for child in children:
                if not self.params.ignore_eos and child.tokens[-1] in self.eos:
                    child.finish_reason = "stop"
                    self.finished[i].append(child)
                else:
                    kept.append(child)
            self.live[i] = sorted(kept, key=lambda s: s.cum_logprob, reverse=True)[:w]
        self.rounds += 1

    def outputs(self, decode) -> list[BeamSearchOutput]:
        """The best beam_width sequences of each prompt, best first, with their text (`decode(ids)`)."""
        out = []
        for i, (live, finished) in enumerate(zip(self.live, self.finished)):
            for seq in live:
                seq.finish_reason = "length"
            ranked = sorted(finished + live, key=lambda s: beam_score(s, self.eos, self.params.length_penalty),
                            reverse=True)[:self.params.beam_width]
            for seq in ranked:
                seq.text = decode(seq.tokens[self.prompt_lens[i]:])
            out.append(BeamSearchOutput(ranked))
        return out


_ids = itertools.count()


def run(engine, prompts: list[list[int]], params: BeamSearchParams, lora_request=None) -> list[BeamSearchOutput]:
    """The search over an LLMEngine (the engine's own step loop; nothing else may be running on it)."""
    search = BeamSearch(prompts, params, engine.eos_token_ids)
    sp = round_params(params)
    while not search.done:
        keys = {}
        for key, tokens in search.pending():
            rid = f"beam-{next(_ids)}"
            keys[rid] = key
            engine.add_request(rid, tokens, sp, lora_request=lora_request)
        results = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id in keys and out.new_logprobs:
                    results[keys[out.request_id]] = out.new_logprobs[0]
        search.advance(results)
    return search.outputs(lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))


async def run_async(engine, prompt: list[int], params: BeamSearchParams, request_id: str,
                    lora_request=None) -> BeamSearchOutput:
    """The search for one prompt over an AsyncLLM: each round's beams are requests running side by side with the
    server's other traffic. Cancelling it aborts the round in flight."""
    search = BeamSearch([prompt], params, engine.engine.eos_token_ids)
    sp = round_params(params)
    adapter = {} if lora_request is None else {"lora_request": lora_request}
    cached = []  # the first round's: its one request is the prompt itself

    async def expand(key, tokens, rid):
        async for out in engine.generate(tokens, sp, rid, **adapter):
            if not cached:
                cached.append(out.num_cached_tokens)
            if out.new_logprobs:
                return key, out.new_logprobs[0]
        raise RuntimeError(f"beam request {rid} ended without a token")

    while not search.done:
        round_ = search.rounds
        results = await asyncio.gather(*(expand(key, tokens, f"{request_id}-beam{round_}-{key[1]}")
                                         for key, tokens in search.pending()))
        search.advance(dict(results))
    result = search.outputs(lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))[0]
    result.num_cached_tokens = cached[0] if cached else 0
    return result


async def choice_outputs(engine, jobs):
    """The server's use_beam_search (engine/server.py): jobs are the response's choices, n = beam_width per prompt
    (choice p*n + j is prompt p's j-th best beam, with .prompt_ids, .beam, .params, .lora, .request_id). Yields
    (job, its whole output as one finished RequestOutput) as each prompt's search ends. Leaving early cancels the
    searches, which aborts their rounds in flight."""
    groups: dict[int, list] = {}
    for job in jobs:
        groups.setdefault(job.index // job.beam.beam_width, []).append(job)
    searches = [asyncio.ensure_future(run_async(engine, g[0].prompt_ids, g[0].beam, g[0].request_id, g[0].lora))
                for g in groups.values()]
    try:
        for group, search in zip(groups.values(), searches):
            result = await search
            for job, seq in zip(group, result.sequences):
                new = seq.tokens[len(job.prompt_ids):]
                lps = seq.logprobs if job.params.logprobs is not None else None
                yield job, RequestOutput(job.request_id, new, seq.text, lps, True, seq.finish_reason, None,
                                         len(job.prompt_ids), len(new), result.num_cached_tokens)
    finally:
        for search in searches:
            search.cancel()
