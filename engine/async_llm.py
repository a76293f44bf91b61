"""AsyncLLM: the engine behind an asyncio API, for the server.

The engine loop runs in one background thread, which alone touches the engine. Callers send it commands (add,
abort) through a thread-safe queue; it sends each request's outputs to that request's asyncio queue with
`call_soon_threadsafe`. When nothing is running the thread sleeps on the command queue, so an idle server costs
nothing. A consumer that stops listening (client gone, task cancelled) aborts its request, freeing its pages.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import jax

import ie_jax
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, frozen_heap
from engine.lora import LoRARequest
from engine.outputs import RequestOutput, merge_outputs
from ie_jax.hub import resolve_model
from ie_jax.sampling import SamplingParams, model_sampling_defaults


def enable_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache: the second start-up loads the compiled step buckets from disk."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, default_sampling: dict | None = None):
        self.engine = engine
        # SamplingParams fields a request leaving them unset takes (the checkpoint's generation_config.json)
        self.default_sampling = dict(default_sampling or {})
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.engine_config = engine.config
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = threading.Event()
        self.errored: BaseException | None = None
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="ie-jax-score")  # prompt logprobs (`score`)
        self._thread = threading.Thread(target=self._loop, name="ie-jax-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, args) -> "AsyncLLM":
        """Build from the serve.py argparse namespace (vLLM's flag names)."""
        from engine.serve_flags import served_tokenizer
        enable_compilation_cache(getattr(args, "compilation_cache_dir", None))
        hub = dict(revision=getattr(args, "revision", None), download_dir=getattr(args, "download_dir", None))
        path = resolve_model(args.model, weights=args.load_format != "dummy", **hub)  # a Hub name: fetched
        local = argparse.Namespace(**{**vars(args), "model": path})
        if getattr(args, "tokenizer", None):
            local.tokenizer = resolve_model(args.tokenizer, weights=False, **hub)
        default_sampling = model_sampling_defaults(path, getattr(args, "generation_config", "auto"),
                                                   getattr(args, "override_generation_config", None))
        if path != args.model and default_sampling:  # (serve.py's start-up note saw no local file)
            print(f"note: default sampling parameters from {args.model}'s generation_config.json: {default_sampling}",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        model, tokenizer = ie_jax.load_model(path, dtype=args.dtype, load_format=args.load_format,
                                             seed=args.seed, quantization=getattr(args, "quantization", None))
        tokenizer = served_tokenizer(local, model, tokenizer)  # --tokenizer, --chat-template
        max_model_len = args.max_model_len or min(model.config.max_position_embeddings, 8192)
        config = EngineConfig(
            max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=max(args.max_num_batched_tokens or 0, args.max_num_seqs) or 2048,
            page_size=args.page_size, num_pages=args.num_pages, gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, max_queue=args.max_queue,
            compilation_cache_dir=args.compilation_cache_dir,
            unroll_layers=getattr(args, "unroll_layers", True),
            kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"), enable_lora=getattr(args, "enable_lora", False),
            max_loras=getattr(args, "max_loras", 1), max_lora_rank=getattr(args, "max_lora_rank", 16),
            max_logprobs=getattr(args, "max_logprobs", 20),
            speculative_config=getattr(args, "speculative_config", None),
            pooler_config=getattr(args, "pooler_config", None), token_buckets=getattr(args, "token_buckets", None),
            calculate_kv_scales=getattr(args, "calculate_kv_scales", False))
        t1 = time.perf_counter()
        print(f"model {args.model!r} ready on {jax.devices()[0].device_kind} in {t1 - t0:.1f} s", file=sys.stderr,
              flush=True)
        engine = LLMEngine(model, tokenizer, config, owns_model=True, background_extras=True)
        for i, lora in enumerate(getattr(args, "lora_modules", None) or []):  # LoRARequests, ids from 1
            engine.add_lora(dataclasses.replace(lora, lora_int_id=i + 1))
        w = engine.runner.warmup_times
        print(f"engine warm-up: {len(engine.runner.executables)} step executables in {time.perf_counter() - t1:.1f} s "
              f"(summed over threads: trace+lower {w['lower']:.1f} s, compile {w['compile']:.1f} s; compilation cache "
              f"{w['cache_hits']} hits, {w['cache_misses']} misses); {engine.runner.num_pages} KV pages of "
              f"{config.page_size} tokens", file=sys.stderr, flush=True)
        return cls(engine, default_sampling)

    # ------------------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        try:
            with frozen_heap():  # the start-up heap out of the collector's walks while serving
                while not self._stopped.is_set():
                    # idle: one executable's first run (`prime_next`), then a look at the commands without waiting
                    block = not engine.has_unfinished_requests() and not engine.runner.prime_next()
                    try:
                        while True:
                            command = self._commands.get(block=block, timeout=0.5 if block else None)
                            block = False
                            self._run_command(command)
                    except queue.Empty:
                        pass
                    if engine.has_unfinished_requests():
                        self._deliver_step(engine.step())
        except BaseException as e:  # the engine broke: fail every open stream rather than hang them
            self.errored = e
            for rid in list(self._streams):
                self._deliver(rid, e)

    def _run_command(self, command) -> None:
        kind, args, done = command
        error = result = None
        try:
            if kind == "add":
                self.engine.add_request(*args)
            elif kind == "add_lora":
                self.engine.add_lora(*args)
            elif kind == "remove_lora":
                self.engine.remove_lora(*args)
            elif kind == "abort":
                self.engine.abort_request(*args)
                self._streams.pop(args[0], None)
            elif kind == "reset_prefix_cache":
                result = self.engine.reset_prefix_cache()
        except Exception as e:  # noqa: BLE001  (handed to the caller)
            error = e
        if done is not None:
            loop, future = done
            loop.call_soon_threadsafe(_settle, future, error, result)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        loop, q = stream
        loop.call_soon_threadsafe(q.put_nowait, item)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one call: a wake-up per output (1,000 a step at full
        batch) would cost the engine thread more than the step's own host work."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                self._streams.pop(out.request_id, None)
            loop, q = stream
            batches.setdefault(loop, []).append((q, out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    async def _send(self, kind: str, *args):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put((kind, args, (loop, future)))
        return await future

    async def score(self, prompt_token_ids: list[int], num_top: int,
                    lora_request: LoRARequest | None = None) -> list[dict[int, float] | None]:
        """The prompt's logprobs (LLMEngine.score_prompt), on a thread of their own: the scoring forward (and its
        compilation, the first time a prompt length bucket comes) runs beside the engine's steps instead of
        holding up every stream. It reads the weights only; the steps donate the caches, never the weights (and
        an adapter goes into a private copy of the LoRA factors, ModelRunner.score)."""
        if self.errored is not None:
            raise RuntimeError(f"the engine has stopped: {self.errored!r}")
        if lora_request is not None and lora_request.lora_name not in self.engine.adapters:
            await self.add_lora(lora_request)  # read on the engine thread, which owns the adapter table
        return await asyncio.get_running_loop().run_in_executor(self._scorer, self.engine.score_prompt,
                                                                list(prompt_token_ids), num_top, lora_request)

    async def embed(self, prompts: list[list[int]]):
        """Pooled embeddings (LLMEngine.embed) on the scoring thread, beside the steps, as `score` runs."""
        if self.errored is not None:
            raise RuntimeError(f"the engine has stopped: {self.errored!r}")
        return await asyncio.get_running_loop().run_in_executor(self._scorer, self.engine.embed,
                                                                [list(p) for p in prompts])

    # ------------------------------------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str,
                       priority: int = 0, lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output deltas until one has finished=True. Bad input raises ValueError; a full
        queue raises OverflowError."""
        if self.errored is not None:
            raise RuntimeError(f"the engine has stopped: {self.errored!r}")
        if sampling_params.guided_decoding is not None:  # compiled beside the engine thread, not on it
            await asyncio.get_running_loop().run_in_executor(self._scorer, self.engine.guide,
                                                             sampling_params.guided_decoding)
        prompt_lps = None
        if sampling_params.prompt_logprobs is not None:  # scored beside the engine, sent with the first output
            prompt_lps = await self.score(prompt_token_ids, sampling_params.prompt_logprobs, lora_request)
            sampling_params = dataclasses.replace(sampling_params, prompt_logprobs=None)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        try:
            await self._send("add", request_id, list(prompt_token_ids), sampling_params, priority, lora_request)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finished = False
        try:
            while not finished:
                item = await q.get()
                # A consumer that fell behind gets the deltas waiting for it as one (as vLLM's output collector
                # does): under load the server's work per step then grows with the streams, not their tokens.
                while not q.empty() and isinstance(item, RequestOutput) and not item.finished:
                    later = q.get_nowait()
                    item = later if isinstance(later, BaseException) else merge_outputs(item, later)
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item!r}") from item
                finished = item.finished
                if prompt_lps is not None:
                    item, prompt_lps = dataclasses.replace(item, prompt_logprobs=prompt_lps), None
                yield item
        finally:
            if not finished:
                self._commands.put(("abort", (request_id,), None))
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        await self._send("abort", request_id)

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Read an adapter (on the engine thread, between steps); errors are raised here."""
        await self._send("add_lora", lora_request)

    async def remove_lora(self, lora_name: str) -> None:
        await self._send("remove_lora", lora_name)

    async def reset_prefix_cache(self) -> bool:
        """On the engine thread, between steps: False while a request holds pages."""
        return await self._send("reset_prefix_cache")

    def list_loras(self) -> list[LoRARequest]:
        return self.engine.list_loras()

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._commands.put(("noop", (), None))
        self._thread.join(timeout)
        self._scorer.shutdown(wait=False)


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)


def _settle(future: asyncio.Future, error: BaseException | None, result=None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)

