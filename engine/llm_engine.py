"""LLMEngine: requests in, token deltas out. `step()` is schedule → execute → update.

The engine validates requests, resolves their seeds, and turns sampled ids into text and stop decisions; it leaves
page bookkeeping to the scheduler/block manager and the device to the runner.
"""
from __future__ import annotations

import contextlib
import gc
import threading
import time
from typing import NamedTuple

import numpy as np
from flax import nnx

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.lora import AdapterWeights, LoRARequest, read_adapter
from engine.outputs import RequestOutput
from engine.request import FINISHED_LENGTH, FINISHED_STOPPED, Request
from engine.pooling import Embedder
from engine.runner import ModelRunner
from engine.variants import VARIANTS, row_variant, step_variant
from engine.scheduler import Scheduler, SchedulerOutput
from engine.speculative import DraftRow, History, accepted, propose
from ie_jax.detokenizer import make_detokenizer
from ie_jax.guided import (BadWordsGuide, FixedGuide, GuidedDecodingParams, TokenGuide, Vocabulary, bad_word_ids,
                           token_bytes)
from ie_jax.quant import kv_scales
from ie_jax.sampling import SamplingParams
from ie_jax.stopping import check_stop


_frozen = [0]  # depth of nested `frozen_heap` scopes, process-wide
_frozen_lock = threading.Lock()


@contextlib.contextmanager
def frozen_heap():
    """While serving, keep what existed before it (model, executables, tokenizer) out of Python's cyclic collector:
    a full collection then walks only what serving allocates. Unfrozen, one took 0.32 s in the middle of a 7.3 s
    offline run on the H200's host (1,000 requests of 128/128, `bench_throughput.py`). Leaving the outermost scope
    unfreezes everything (also what the interpreter froze itself: a cost of collection time only), so an engine
    dropped later is collected as usual."""
    with _frozen_lock:
        _frozen[0] += 1
        if _frozen[0] == 1:
            gc.freeze()
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen[0] -= 1
            if _frozen[0] == 0:
                gc.unfreeze()


class _InFlight(NamedTuple):
    """A step dispatched and not yet read back."""
    out: SchedulerOutput
    samples: list[bool]  # which rows sampled a token
    res: object  # the device-side sample output
    grammars: int  # rows whose grammar waits for the token they sampled


class _TextStream:
    """A request's output text as far as the engine still needs it: its detokenizer and a window of the text,
    holding what is not yet sent (held back as a possible stop-string start) plus enough sent text before it for a
    stop string to be found across the boundary. The window stays a few characters long, so a token costs the same
    at token 10 and 10,000 (keeping the whole text cost O(length) a token)."""
    __slots__ = ("detok", "window", "sent", "holdback", "context", "plain", "plain_rule", "stop_ids",
                 "prompt_logprobs")

    def __init__(self, detok, params: SamplingParams, eos_token_ids: tuple[int, ...], prompt_logprobs=None):
        self.detok = detok
        # plain: only EOS (these ids), max_tokens or the model length can end it, its text is never held back and
        # its output carries nothing else (no logprobs; prompt logprobs go with the first output)
        self.plain = self.plain_rule = not params.stop and not params.stop_token_ids and params.logprobs is None
        self.prompt_logprobs = prompt_logprobs
        if prompt_logprobs is not None:
            self.plain = False  # until the first output has taken them
        self.stop_ids = () if params.ignore_eos else eos_token_ids
        self.window, self.sent = "", 0  # sent: characters of the window already handed out
        longest = max(map(len, params.stop)) - 1 if params.stop else 0
        self.context = longest  # characters before the new text that a stop-string search looks at
        self.holdback = 0 if params.include_stop_str_in_output else longest

    def advance(self, text: str, emit_to: int) -> None:
        """`text` (the window plus this token's piece, maybe cut at a stop) is sent up to `emit_to`: keep what is
        unsent and the context before it."""
        cut = max(0, min(emit_to, len(text) - self.context))
        self.window, self.sent = text[cut:], emit_to - cut


class LLMEngine:
    def __init__(self, model: nnx.Module, tokenizer, config: EngineConfig | None = None, *, warmup: bool = True,
                 progress: bool = True, owns_model: bool = False, background_extras: bool = False):
        """`owns_model`: the engine may release the model's stacked layer weights (see ModelRunner).
        `background_extras` (the server): compile every cheaper step variant (engine/variants.py) on a background
        thread after start-up; otherwise only the argmax-only one, before returning (see ModelRunner.warmup)."""
        self.config = config = config or EngineConfig()
        self.model_config = model.config
        if config.max_model_len > model.config.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings="
                             f"{model.config.max_position_embeddings}")
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or model.config.eos_token_id)
        scales = None  # vLLM's --calculate-kv-scales: an fp8 cache whose checkpoint has no scales gets calibrated ones
        if config.calculate_kv_scales and config.fp8_kv_cache and getattr(model, "kv_cache_scales", None) is None:
            scales = kv_scales.calculate(model, tokenizer)
        self.runner = ModelRunner(model, config, owns_model=owns_model, kv_cache_scales=scales)
        self.embedder: Embedder | None = None  # built by the first embed()
        self.block_manager = BlockManager(self.runner.num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.rng = np.random.default_rng(config.seed)
        self.streams: dict[str, _TextStream] = {}  # each request's detokenizer and unsent text
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self.spec = config.speculative_config  # prompt-lookup speculation (engine/speculative.py), or None
        self.num_draft_tokens = self.num_accepted_tokens = 0
        self._histories: dict[str, History] = {}  # speculating requests' tokens, as numpy buffers
        self.last_step_host_s = 0.0
        self.last_step_times: dict[str, float] = {}
        self.in_flight: _InFlight | None = None  # the step dispatched and not yet read back
        self.adapters: dict[str, AdapterWeights] = {}  # LoRA adapters read so far, by name (engine/lora.py)
        self.guides: dict[GuidedDecodingParams, TokenGuide] = {}  # compiled structured-output guides, LRU
        self._guides_lock = threading.Lock()  # the server compiles guides off the engine thread (AsyncLLM)
        self._token_bytes: Vocabulary | None = None  # the tokenizer's token bytes, for the guides
        if warmup:
            self.runner.warmup(progress, background_extras=background_extras,
                               extra_variants=VARIANTS[1:] if background_extras else ("greedy",))

    # ------------------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, lora_request: LoRARequest | None = None) -> Request:
        params = params or SamplingParams()
        if lora_request is not None:
            self.add_lora(lora_request)
        if params.n != 1:
            raise ValueError(f"n={params.n}: the engine runs one sequence per request; fan out n>1 above it")
        ids = self.encode(prompt)
        max_len = self.config.max_model_len
        if len(ids) + params.max_tokens > max_len:
            raise ValueError(f"This model's maximum context length is {max_len} tokens. However, you requested "
                             f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, {params.max_tokens} "
                             f"for the completion). Please reduce the prompt or max_tokens.")
        V = self.model_config.vocab_size
        error = params.vocab_error(V)
        if error is not None:
            raise ValueError(error[1])
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.config.max_logprobs:
                raise ValueError(f"{name}={k} exceeds max_logprobs={self.config.max_logprobs}")
        if self.config.max_queue is not None and len(self.scheduler.waiting) >= self.config.max_queue:
            raise OverflowError(f"the waiting queue is full ({self.config.max_queue} requests)")
        adapter = None if lora_request is None else self.adapters[lora_request.lora_name]
        prompt_lps = None if params.prompt_logprobs is None else self.runner.score(ids, params.prompt_logprobs, adapter)
        seed = params.seed if params.seed is not None else int(self.rng.integers(2**32))
        request = Request(request_id, ids, params, seed, self.eos_token_ids, priority,
                          variant=row_variant(params, self.model_config.vocab_size),
                          lora_name=None if lora_request is None else lora_request.lora_name,
                          guide=self.guide(params.guided_decoding) if params.guided else
                          FixedGuide(params.allowed_token_ids, V) if params.allowed_token_ids else
                          self.bad_words_guide(params.bad_words) if params.bad_words else None)
        self.scheduler.add(request)
        self.streams[request_id] = _TextStream(
            make_detokenizer(self.tokenizer, ids, params.skip_special_tokens) if self.tokenizer is not None else None,
            params, self.eos_token_ids, prompt_lps)
        return request

    # ------------------------------------------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read a PEFT adapter (once per name) so that requests can name it; returns True when it was new. It
        takes a device slot only when a request using it is scheduled."""
        if not self.config.enable_lora:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)")
        known = self.adapters.get(lora_request.lora_name)
        if known is not None:
            if known.request.lora_path != lora_request.lora_path:
                raise ValueError(f"adapter {lora_request.lora_name!r} is already loaded from "
                                 f"{known.request.lora_path!r}, not {lora_request.lora_path!r}")
            return False
        cfg = self.config
        self.adapters[lora_request.lora_name] = read_adapter(lora_request, self.model_config, self.runner.lora_layout,
                                                             cfg.max_lora_rank, self.runner.weights[0].dtype)
        return True

    def remove_lora(self, lora_name: str) -> bool:
        """Forget an adapter; refused while a request uses it. Returns False for an unknown name."""
        if lora_name not in self.adapters:
            return False
        users = [r.request_id for r in self.scheduler.requests.values() if r.lora_name == lora_name]
        if users:
            raise ValueError(f"adapter {lora_name!r} is in use by {len(users)} request(s), e.g. {users[0]!r}")
        self.scheduler.adapter_slots.forget(lora_name)
        del self.adapters[lora_name]
        return True

    def list_loras(self) -> list[LoRARequest]:
        return [a.request for a in self.adapters.values()]

    def bad_words_guide(self, words: tuple[str, ...]) -> BadWordsGuide:
        """The guide banning `words` (cached beside the structured-output guides: a client that sends the same list
        with every request builds it once, and its rows stay the same guide's)."""
        if self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer: this model has none")
        return self._cached(("bad_words", tuple(words)), lambda: BadWordsGuide(
            bad_word_ids(self.tokenizer, words), self.model_config.vocab_size))

    def guide(self, spec: GuidedDecodingParams) -> TokenGuide:
        """The compiled guide of a structured-output spec (cached: the 32 most recently used guides). Thread-safe:
        the server builds guides on another thread, so the engine thread finds them ready."""
        if self.tokenizer is None:
            raise ValueError("guided decoding needs the model's tokenizer")

        def build() -> TokenGuide:
            if self._token_bytes is None:
                self._token_bytes = Vocabulary(token_bytes(self.tokenizer, self.model_config.vocab_size))
            return TokenGuide(spec.dfa(), self._token_bytes, self.eos_token_ids)
        return self._cached(spec, build)

    def _cached(self, key, build):
        with self._guides_lock:
            guide = self.guides.pop(key, None)
            if guide is not None:
                self.guides[key] = guide
                return guide
        guide = build()
        with self._guides_lock:
            while len(self.guides) >= 32:
                self.guides.pop(next(iter(self.guides)))
            self.guides[key] = guide
        return guide

    def score_prompt(self, prompt: str | list[int], num_top: int,
                     lora_request: LoRARequest | None = None) -> list[dict[int, float] | None]:
        """The prompt's logprobs alone (what a request with prompt_logprobs=num_top and no output would get): the
        server's echo with max_tokens=0."""
        if not 0 <= num_top <= self.config.max_logprobs:
            raise ValueError(f"logprobs={num_top} must be in [0, max_logprobs={self.config.max_logprobs}]")
        adapter = None
        if lora_request is not None:  # read now if new (the server reads it on the engine thread first)
            self.add_lora(lora_request)
            adapter = self.adapters[lora_request.lora_name]
        return self.runner.score(self.encode(prompt), num_top, adapter)

    def embed(self, prompts: list[str | list[int]]) -> list[np.ndarray]:
        """Each prompt's pooled embedding, [D] f32 (engine/pooling.py, with the config's pooler): beside the steps,
        as score_prompt is. Prompts longer than max_model_len are refused."""
        ids = [self.encode(p) for p in prompts]
        for i, x in enumerate(ids):
            if len(x) > self.config.max_model_len:
                raise ValueError(f"input {i} has {len(x)} tokens, more than max_model_len={self.config.max_model_len}")
        if self.embedder is None:
            self.embedder = Embedder(self.runner, self.config.pooler_config)
        return self.embedder.embed(ids)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        V = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {V})")
        return ids

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (BlockManager.reset_prefix_cache): False while a request holds pages."""
        return self.block_manager.reset_prefix_cache()

    def abort_request(self, request_id: str) -> None:
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._retire(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or (
            self.in_flight is not None and any(not r.is_finished for r, _ in self.in_flight.out.scheduled))

    # ------------------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and dispatch step n+1, then read back and process step n.

        Step n+1 is built before step n's tokens reach the host: a request that sampled in step n carries a
        placeholder (-1) as its newest token, which the device fills from its own copy. So the device never waits
        for the host between steps; the one host sync per step is the token read-back of the step before.

        A grammar-guided request cannot take part while its newest token is on the device (its next mask needs
        it). Where such requests are at least half of the running ones, step n is read back first and the step
        runs synchronously, so that they advance every step; otherwise they sit out every other step and the
        rest keep the overlap.
        """
        if self.spec is not None and not self.scheduler.waiting and self._seats() > 0:
            return self._spec_step()  # synchronous; a full batch (no seat for a draft) keeps the overlap below
        t0 = time.perf_counter()
        outputs, t_wait = [], 0.0
        if self.in_flight is not None and 2 * self.in_flight.grammars >= max(len(self.scheduler.running), 1):
            outputs, t_wait = self._read_back()
        out = self._schedule()
        dispatched, t_dispatch = None, 0.0
        if out.scheduled:
            inp, samples = self.runner.prepare(out)  # seats newly running requests too
            t1 = time.perf_counter()
            # the cheapest sampler these rows allow (argmax only, no sort, no logprobs, ...)
            res = self.runner.run(inp, step_variant({r.variant for r, _ in out.scheduled}),  # asynchronous
                                  decode_only=out.num_tokens == len(out.scheduled))  # one token each
            t_dispatch = time.perf_counter() - t1
            self.scheduler.update(out)
            grammars = 0  # rows whose grammar now waits for the sampled token
            for (request, n), sampled in zip(out.scheduled, samples):
                if sampled:
                    if not request.output_token_ids and not request.num_preemptions:
                        self.num_prompt_tokens += request.num_prompt_tokens
                    request.output_token_ids.append(-1)  # placeholder until the read-back below (next call)
                    if request.guide is not None and not request.guide.static:
                        grammars += 1
            dispatched = _InFlight(out, samples, res, grammars)
        if self.in_flight is not None:
            more, t_wait = self._read_back()
            outputs += more
        self.in_flight = dispatched
        total = time.perf_counter() - t0
        # Host time = everything but waiting for the device (dispatch included: it should not block).
        self.last_step_times = {"host": total - t_wait, "dispatch": t_dispatch, "wait": t_wait, "total": total}
        self.last_step_host_s = total - t_wait
        return outputs

    def _schedule(self) -> SchedulerOutput:
        """The scheduler's next step, with the slots of preempted requests released and the adapters that took a
        slot this step written (before it runs)."""
        out = self.scheduler.schedule()
        for request in out.preempted:
            self.runner.release_slot(request)
        if self.scheduler.adapter_slots is not None:
            for slot, name in self.scheduler.adapter_slots.take_loads():
                self.runner.load_adapter(slot, self.adapters[name])
        return out

    def _drafts(self) -> dict[Request, list[int]]:
        """Each speculating request's draft (engine/speculative.py), within the step's free seats and budget and
        short of max_tokens and max_model_len. None while prompts wait (they go first) or a row wants logprobs."""
        sched, cfg, spec = self.scheduler, self.config, self.spec
        if sched.waiting or any(r.sampling_params.logprobs is not None for r in sched.running):
            return {}
        seats, drafts = self._seats(), {}
        for request in sched.running:
            outputs = request.output_token_ids
            if seats <= 0:
                break
            p = request.sampling_params
            if p.penalised or p.guided_decoding is not None or not outputs or outputs[-1] < 0 or \
                    request.num_computed_tokens + 1 != request.num_tokens:
                continue  # (penalties would need the drafts in the device's counts, a grammar its state)
            k = min(spec.num_speculative_tokens, seats, p.max_tokens - len(outputs) - 1,
                    cfg.max_model_len - request.num_tokens - 1)
            if k > 0:
                history = self._histories.setdefault(request.request_id, History())
                draft = propose(history.tokens(request.prompt_token_ids, outputs), k, spec.prompt_lookup_max,
                                spec.prompt_lookup_min)
                if draft:
                    drafts[request] = draft
                    seats -= len(draft)
        return drafts

    def _seats(self) -> int:
        """Rows a step could still take for drafts."""
        return min(self.config.max_num_seqs, self.config.max_num_batched_tokens) - len(self.scheduler.running)

    def _spec_step(self) -> list[RequestOutput]:
        """One synchronous step in which speculating requests check their drafts (engine/speculative.py): each
        runs as 1 + d one-token rows, and keeps the drafts the model agrees with plus the model's next token. A
        step still in flight (the batch was full) is read back first: drafts start from the newest token."""
        t0 = time.perf_counter()
        early, t_early = self._read_back() if self.in_flight is not None else ([], 0.0)
        drafts = self._drafts()
        for request, draft in drafts.items():  # the scheduler sees the drafts as tokens to compute, and pages them
            request.output_token_ids += draft
        try:
            out = self._schedule()
        finally:
            for request, draft in drafts.items():
                del request.output_token_ids[-len(draft):]
        if not out.scheduled:
            return early
        rows, plan = [], []  # the step's rows; per scheduled request: (request, n, the drafts it checks or None)
        for request, n in out.scheduled:
            used = drafts[request][:n - 1] if request in drafts and n > 1 else None
            rows += [(request, 1)] + [(DraftRow(request, used[:j]), 1) for j in range(1, n)] if used else \
                [(request, n)]
            plan.append((request, n, used))
        inp, samples = self.runner.prepare(SchedulerOutput(rows, out.preempted))
        t1 = time.perf_counter()
        res = self.runner.run(inp, step_variant({r.variant for r, _ in out.scheduled}),
                              decode_only=len(rows) == sum(n for _, n in rows))
        t2 = time.perf_counter()
        tokens = np.asarray(res.token_ids).tolist()
        t3 = time.perf_counter()
        kept, kept_samples, kept_tokens, row = [], [], [], 0
        for request, n, used in plan:
            if used is None:
                request.num_computed_tokens += n
                take = [tokens[row]] if samples[row] else []
            else:
                a = accepted(used, tokens[row:row + n])
                self.num_draft_tokens += len(used)
                self.num_accepted_tokens += a
                request.num_computed_tokens += 1 + a
                take = tokens[row:row + a + 1]
            self.block_manager.cache_full_pages(request)
            if take and not request.output_token_ids and not request.num_preemptions:
                self.num_prompt_tokens += request.num_prompt_tokens
            request.output_token_ids += [-1] * len(take)  # placeholders, resolved in order by _update
            kept += [(request, 1)] * len(take) or [(request, n)]
            kept_samples += [True] * len(take) or [False]
            kept_tokens += take or [0]
            row += n if used else 1
        outputs = self._update(SchedulerOutput(kept, []), kept_samples, np.asarray(kept_tokens, np.int64), res)
        total, wait = time.perf_counter() - t0, t3 - t2 + t_early
        self.last_step_times = {"host": total - wait, "dispatch": t2 - t1, "wait": wait, "total": total}
        self.last_step_host_s = total - wait
        return early + outputs

    def _read_back(self) -> tuple[list[RequestOutput], float]:
        """Wait for the step in flight (the one host sync per step) and resolve it; returns its outputs and the
        seconds spent waiting."""
        out, samples, res, _ = self.in_flight
        self.in_flight = None
        t = time.perf_counter()
        token_ids = np.asarray(res.token_ids)
        wait = time.perf_counter() - t
        return self._update(out, samples, token_ids, res), wait

    def _update(self, out: SchedulerOutput, samples, token_ids, res) -> list[RequestOutput]:
        """Resolve a finished step's placeholders: append text, apply stop rules, emit deltas.

        A row of a plain request (no stop strings or stop ids, no logprobs) whose token cannot end it (not EOS,
        under max_tokens and the model length) takes a short path: its text is the detokenizer's piece as it is.
        Every other row, and a plain one that may stop, goes through `_resolve` (the stop rules, the held-back
        text). At 1,000 rows a step, the short path is most of the engine's host time saved per step."""
        lp = top_ids = top_lp = None
        if any(r.sampling_params.logprobs is not None for r, _ in out.scheduled):
            lp, top_ids, top_lp = (np.asarray(x) for x in (res.logprobs, res.top_ids, res.top_logprobs))
        outputs = []
        now = time.monotonic()
        limit = self.config.max_model_len
        for row, ((request, n), sampled, tok) in enumerate(zip(out.scheduled, samples, token_ids.tolist())):
            if not sampled or request.is_finished:  # a finished request's extra token is dropped
                continue
            ids = request.output_token_ids
            index = len(ids) - 1  # the oldest placeholder: placeholders (-1) sit at the end, at most two
            while index > 0 and ids[index - 1] < 0:
                index -= 1
            assert ids[index] < 0, "a sampled token without its placeholder"
            ids[index] = tok
            if request.guide is not None:
                request.guide_state = request.guide.advance(request.guide_state, tok)
            if request.first_token_time is None:
                request.first_token_time = now
            stream = self.streams[request.request_id]
            piece = stream.detok.add(tok) if stream.detok is not None else ""
            num = index + 1
            if (stream.plain and num < request.sampling_params.max_tokens and tok not in stream.stop_ids
                    and len(request.prompt_token_ids) + num < limit):
                outputs.append(RequestOutput(request.request_id, [tok], piece, None, False, None, None,
                                             len(request.prompt_token_ids), num, request.num_cached_tokens))
            else:
                new_lp = None
                if request.sampling_params.logprobs is not None:
                    k = request.sampling_params.logprobs
                    new_lp = [{**{int(i): float(v) for i, v in zip(top_ids[row, :k], top_lp[row, :k])},
                               tok: float(lp[row])}]
                    request.output_logprobs.extend(new_lp)
                outputs.append(self._resolve(request, stream, tok, piece, index, new_lp))
        self.num_generation_tokens += len(outputs)
        return outputs

    def _resolve(self, request: Request, stream: "_TextStream", tok: int, piece: str, index: int,
                 new_lp) -> RequestOutput:
        """The general rules for one sampled token at output position `index`: stop checks on the text window,
        the held-back text, finishing and retiring the request."""
        p = request.sampling_params
        text = stream.window + piece
        stop = check_stop(p, tok, index + 1, self.eos_token_ids, text, len(piece),
                          at_max_len=request.num_prompt_tokens + index + 1 >= self.config.max_model_len)
        if stop is None:
            # Hold back what could be the start of a stop string, so streamed text never needs taking back.
            emit_to = max(stream.sent, len(text) - stream.holdback)
        else:
            if not isinstance(stop.stop_reason, str) and stream.detok is not None:
                stop.text += stream.detok.flush()  # a run that ends mid-character still shows what it produced
            text, emit_to = stop.text, len(stop.text)
            request.stop_reason = stop.stop_reason
            del request.output_token_ids[index + 1:]  # a token sampled after the stop is not output
            self.scheduler.finish(request, FINISHED_STOPPED if stop.finish_reason == "stop" else FINISHED_LENGTH)
        new_text = text[stream.sent: emit_to]
        stream.advance(text, emit_to)
        output = self._output(request, [tok], new_text, new_lp, index + 1)
        if stream.prompt_logprobs is not None:
            output.prompt_logprobs, stream.prompt_logprobs = stream.prompt_logprobs, None
            stream.plain = stream.plain_rule
        if request.is_finished:
            self._retire(request)
        return output

    def _retire(self, request: Request) -> None:
        self.runner.release_slot(request)
        self.streams.pop(request.request_id, None)
        self._histories.pop(request.request_id, None)

    def _output(self, request: Request, new_ids, new_text, new_lp, num_output: int) -> RequestOutput:
        return RequestOutput(request.request_id, new_ids, new_text, new_lp, request.is_finished,
                             request.status.value if request.is_finished else None, request.stop_reason,
                             request.num_prompt_tokens, num_output, request.num_cached_tokens)

    def stats(self) -> dict:
        bm = self.block_manager
        lora = None
        if self.config.enable_lora:  # adapters of the running and waiting requests (vLLM's lora_requests_info)
            lora = {"running": sorted({r.lora_name for r in list(self.scheduler.running) if r.lora_name}),
                    "waiting": sorted({r.lora_name for r in list(self.scheduler.waiting) if r.lora_name}),
                    "max_lora": self.config.max_loras}
        spec = {} if self.spec is None else {"spec_draft_tokens": self.num_draft_tokens,
                                              "spec_accepted_tokens": self.num_accepted_tokens}
        return {"lora": lora, "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_usage": bm.usage, "prefix_cache_queries": bm.prefix_queries, "prefix_cache_hits": bm.prefix_hits,
                "num_preemptions": self.scheduler.num_preemptions, **spec,
                "prompt_tokens_total": self.num_prompt_tokens, "generation_tokens_total": self.num_generation_tokens}
