"""The OpenAI-compatible HTTP server: FastAPI routes over one `AsyncLLM`.

    POST /v1/completions, /v1/chat/completions   (stream or not; n, logprobs, stop, usage, ...; completions'
                                                  echo + logprobs adds the prompt's logprobs, max_tokens=0 only those)
    POST /v1/embeddings   (each input's pooled hidden states: engine/pooling.py)
    POST /invocations   (SageMaker's route: a chat or completion body, by its fields)
    GET  /v1/models, /health, /version, /metrics
    POST /tokenize, /detokenize
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   (with --enable-lora and runtime updates allowed)

A request whose `model` names a LoRA adapter (--lora-modules, or loaded at run time) runs with that adapter; the
adapters are listed in /v1/models with the base model as their parent, as vLLM lists them.

A request goes: pydantic validation → token ids and `SamplingParams` → n engine requests (ids "{id}-{index}",
index = prompt * n + choice) → merged outputs → response JSON or SSE chunks. Every error the client can cause
becomes vLLM's error JSON {"error": {"message", "type", "param", "code"}} with status 400 (401, 404, 503 where
those fit), and a stream that fails after its headers went out ends with one error event and `data: [DONE]`.
A client that goes away aborts its engine requests, so their pages are freed.

The server does not detokenize, match stop strings or schedule: the engine does all of that. It does admission:
with `max_queue` set, a request whose engine requests would bring the number admitted but not yet producing a
token past `max_queue` is refused with 503.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator

import anyio
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import engine.protocol as P
from engine import beam_search, shaping
from engine.beam_search import BeamSearchParams
from engine.http_util import BearerAuth, error_response, merge_streams, wait_for_disconnect
from engine.lora import LoRARequest, runtime_lora_updates
from engine.metrics import CONTENT_TYPE, ServerMetrics
from engine.outputs import RequestOutput
from engine.reasoning import ChatMode, ReasoningParser
from engine.responses import ResponseShape, ResponsesRequest
from engine.scoring_routes import add_routes as add_scoring_routes
from engine.stats_log import StatsLog, log_to_stderr
from engine.tools import tool_mode
from ie_jax.sampling import SamplingParams


request_log = logging.getLogger("ie_jax.requests")
MAX_CHOICES = 1024  # engine requests one HTTP request may fan out to (prompts x n)


@dataclasses.dataclass
class _Job:
    """One engine request: choice `index` of the response."""
    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None  # for echo
    score_only: bool = False  # echo with max_tokens=0: the prompt (and its logprobs) is the whole answer
    lora: LoRARequest | None = None  # the adapter the request names as its model
    beam: BeamSearchParams | None = None  # use_beam_search: the choices are its best beams, in order


class OpenAIServer:
    def __init__(self, engine, served_model_name: str | list[str], api_key: str | None, max_queue: int | None,
                 model_root: str | None = None, tool_call_parser: str | None = None, response_role: str = "assistant",
                 reasoning_parser: str | None = None, grammar_in_reasoning: bool = False,
                 return_tokens_as_token_ids: bool = False, trust_request_chat_template: bool = False,
                 log_requests: bool = False, max_log_len: int | None = None):
        # several names (vLLM's --served-model-name a b): any is accepted, the first names the responses
        names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        served_model_name, self.aliases = names[0], tuple(names)
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"{max_queue=} must be None or >= 1")
        self.engine, self.model_name, self.api_key, self.max_queue = engine, served_model_name, api_key, max_queue
        self.model_root = model_root or served_model_name
        self.tool_call_parser = tool_call_parser  # set: "auto" tool choice parses calls out of the text
        self.response_role = response_role  # the role of chat replies (vLLM's --response-role)
        self.reasoning = None if reasoning_parser is None else ReasoningParser(reasoning_parser)
        self.grammar_in_reasoning = grammar_in_reasoning  # vLLM's structured-outputs enable_in_reasoning
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.engine_config.max_model_len
        self.max_logprobs = engine.engine_config.max_logprobs
        self.default_sampling = dict(getattr(engine, "default_sampling", None) or {})  # generation_config's
        self.metrics = ServerMetrics(engine.stats, served_model_name)
        self._pending: set[str] = set()  # admitted engine requests with no token yet
        self.lp = P.LogprobFormat(self.tokenizer)  # the responses' logprobs objects
        self.lp_ids = self.lp.by_id()  # ... naming tokens by id
        self.tokens_as_ids = return_tokens_as_token_ids  # the default of a request's return_tokens_as_token_ids
        self.trust_request_chat_template = trust_request_chat_template  # vLLM's --trust-request-chat-template
        self.log_requests, self.max_log_len = log_requests, max_log_len  # vLLM's --enable-log-requests

    # --- request → engine jobs --------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names, None for the base model; an unknown name is a 404."""
        if model is None or model in self.aliases or model == self.model_root:
            return None
        lora = self.adapters().get(model)
        if lora is None:
            raise P.ServerError(f"The model `{model}` does not exist.", status=404, param="model")
        return lora

    def adapters(self) -> dict[str, LoRARequest]:
        list_loras = getattr(self.engine, "list_loras", None)
        return {} if list_loras is None else {r.lora_name: r for r in list_loras()}

    def encode(self, prompt: str | list[int], add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise P.ServerError(f"token id {bad[0]} is out of vocabulary [0, {vocab})", param="prompt")
        return list(prompt)

    async def embed(self, inputs: list, body, purpose: str) -> tuple[list, list[list[int]]]:
        """Pooled embeddings of `inputs` (text or ids) for /v1/embeddings, /score and /rerank: the base model only,
        each input truncated as the body asks and held to max_model_len. Returns (vectors, token ids)."""
        if self.check_model(body.model) is not None:
            raise P.ServerError(f"{purpose} uses the base model {self.model_name!r}; the LoRA adapter "
                                f"{body.model!r} does not apply to it", param="model")
        ids = [P.truncate(self.encode(x, body.add_special_tokens), body.truncate_prompt_tokens, self.max_model_len)
               for x in inputs]
        longest = max(map(len, ids))
        if longest > self.max_model_len:
            raise P.ServerError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                f"requested {longest} tokens in the input for {purpose}. Please reduce the length "
                                f"of the input.", param="input")
        try:
            return await self.engine.embed(ids), ids
        except ValueError as e:
            raise P.ServerError(str(e), param="input") from e

    def max_tokens(self, num_prompt: int, requested: int | None, param: str) -> int:
        """The least of what is left of max_model_len, the request's max_tokens and generation_config's
        max_new_tokens (vLLM's rule); a request asking past max_model_len raises."""
        if num_prompt == 0:
            raise P.ServerError(f"{param} cannot be empty", param=param)
        if num_prompt >= self.max_model_len:
            raise P.ServerError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                                f"request has {num_prompt} input tokens. Please reduce the length of the input.",
                                param=param)
        if requested is not None and requested >= 1 and num_prompt + requested > self.max_model_len:
            raise P.ServerError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt + requested} tokens ({num_prompt} in the input, {requested} in the completion). "
                f"Please reduce the length of the input or completion.", param="max_tokens")
        limits = (self.max_model_len - num_prompt, requested, self.default_sampling.get("max_tokens"))
        return min(n for n in limits if n is not None)

    def chat_jobs(self, body: P.ChatCompletionRequest, request_id: str) -> tuple[list[_Job], ChatMode | None,
                                                                                 int | None]:
        """A chat request's engine job, how its reply becomes the message, and its top logprobs."""
        lora = self.check_model(body.model)
        tools = tool_mode(body.tools, body.tool_choice, self.tool_call_parser, self.tool_call_parser is not None)
        if not body.messages:
            raise P.ServerError("messages cannot be empty", param="messages")
        if (body.chat_template or (body.chat_template_kwargs or {}).get("chat_template")) and \
                not self.trust_request_chat_template:
            raise P.ServerError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                                "Refused request with untrusted chat template.", param="chat_template")
        try:
            num_top = body.num_logprobs
            ids = body.truncated(body.prompt_ids(self.tokenizer), self.max_model_len)
            max_tokens = self.max_tokens(len(ids), body.requested_max_tokens, "messages")
            params = body.sampling_params(max_tokens, num_top, self.default_sampling)
            params = dataclasses.replace(params, prompt_logprobs=body.num_prompt_logprobs(
                self.engine.model_config.vocab_size, self.max_logprobs))
            if tools is not None and tools.guided() is not None:  # a forced call: held to the tools' schemas
                if params.guided_decoding is not None:
                    raise P.ServerError("a forced tool call cannot take response_format or guided_* as well",
                                        param="tool_choice")
                params = dataclasses.replace(params, guided_decoding=tools.guided())
        except ValueError as e:
            raise P.ServerError(str(e)) from e
        if tools is not None and tools.needs_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)
        params, chat = self.chat_mode(tools, params, ids, body.include_reasoning)
        beam = body.beam_params(params.max_tokens, self.max_logprobs)
        if beam is not None and tools is not None:
            raise P.ServerError("use_beam_search cannot take tools", param="tools")
        return self.jobs(request_id, [(ids, None)], [params], lora=lora, beams=[beam]), chat, num_top

    def chat_mode(self, tools, params: SamplingParams, prompt_ids: list[int], include_reasoning: bool
                  ) -> tuple[SamplingParams, ChatMode | None]:
        """How a chat reply becomes its message (None: as it is), and the params with a grammar moved behind the
        reply's thought (engine/reasoning.py): vLLM's rule, unless the server lets grammars into the thought."""
        parser, spec = self.reasoning, params.guided_decoding
        if parser is None:
            return params, None if tools is None else ChatMode(tools)
        start = parser.start(self.tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False))
        if spec is not None and self.grammar_in_reasoning:
            start = "closed"  # the grammar has the whole reply: it thinks only where it writes <think>
        elif spec is not None and start != "closed":
            params = dataclasses.replace(params, guided_decoding=dataclasses.replace(spec, thought=start))
        return params, ChatMode(tools, parser, start == "open", include_reasoning)

    def jobs(self, request_id: str, prompts: list[tuple[list[int], str | None]], params: list[SamplingParams],
             score_only: bool = False, lora: LoRARequest | None = None,
             beams: list[BeamSearchParams | None] | None = None, echo: bool = False) -> list[_Job]:
        """Fan out n choices per prompt. A seeded request gives choice j the seed ie_jax.generate and LLM derive
        for it, (seed + 7919 j) mod 2^32, so its choices differ and each matches the offline front ends. A prompt's
        logprobs are computed by its first choice only, unless each choice echoes them."""
        total = sum(sp.n for sp in params)
        if total > MAX_CHOICES:
            raise P.ServerError(f"this request asks for {total} completions ({len(params)} prompts, n={params[0].n}); "
                                f"the server takes at most {MAX_CHOICES} in one request", param="n")
        vocab = self.engine.model_config.vocab_size
        for sp in params:  # checked before anything streams (the engine checks again when it adds the request)
            error = sp.vocab_error(vocab)
            if error is not None:
                raise P.ServerError(error[1], param=error[0])
        out = []
        for p, ((ids, text), sp) in enumerate(zip(prompts, params)):
            for j in range(sp.n):
                seed = None if sp.seed is None else (sp.seed + 7919 * j) % 2**32
                index = p * sp.n + j
                scored = sp.prompt_logprobs if j == 0 or echo else None
                out.append(_Job(index, f"{request_id}-{index}", ids,
                                dataclasses.replace(sp, n=1, seed=seed, prompt_logprobs=scored), text, score_only,
                                lora, beams[p] if beams else None))
        return out

    def log_request(self, request_id: str, jobs: list[_Job]) -> None:
        """vLLM's request log line, once per prompt: its text and ids (cut at max_log_len) and sampling params."""
        cut, seen = self.max_log_len, set()
        for job in jobs:
            if id(job.prompt_ids) in seen:  # the prompt's other choices
                continue
            seen.add(id(job.prompt_ids))
            text = job.prompt_text  # a chat prompt: the rendered conversation
            text = self.tokenizer.decode(job.prompt_ids, skip_special_tokens=False) if text is None else text
            text = text if cut is None else text[:cut]
            ids = job.prompt_ids if cut is None else job.prompt_ids[:cut]
            lora = None if job.lora is None else job.lora.lora_name
            request_log.info(f"Received request {request_id}: prompt: {text!r}, params: {job.params}, "
                             f"prompt_token_ids: {ids}, lora_request: {lora}")

    def admit(self, jobs: list[_Job]) -> None:
        if self.max_queue is not None and len(self._pending) + len(jobs) > self.max_queue:
            raise P.ServerError(f"The server is overloaded: {len(self._pending)} requests are queued "
                                f"(max_queue={self.max_queue}). Retry later.", status=503)
        self._pending.update(j.request_id for j in jobs)

    # --- engine outputs ---------------------------------------------------------------------------------------

    async def _run_one(self, job: _Job, priority: int) -> AsyncIterator[RequestOutput]:
        timer = self.metrics.tracker()
        try:
            if job.score_only:
                k = job.params.prompt_logprobs
                adapter = {} if job.lora is None else {"lora_request": job.lora}
                lps = None if k is None else await self.engine.score(job.prompt_ids, k, **adapter)
                timer.on_output(0, True, "length")
                yield RequestOutput(job.request_id, [], "", None, True, "length", None, len(job.prompt_ids), 0, 0,
                                    lps)
                return
            adapter = {} if job.lora is None else {"lora_request": job.lora}
            async for out in self.engine.generate(job.prompt_ids, job.params, job.request_id, priority=priority,
                                                  **adapter):
                self._pending.discard(job.request_id)
                timer.on_output(len(out.new_token_ids), out.finished, out.finish_reason)
                yield out
        finally:
            self._pending.discard(job.request_id)

    async def outputs(self, jobs: list[_Job], priority: int) -> AsyncIterator[tuple[_Job, RequestOutput]]:
        """(job, delta) pairs until every job finished. Leaving early (disconnect, error) aborts the rest."""
        if jobs and jobs[0].beam is not None:
            try:
                async for pair in beam_search.choice_outputs(self.engine, jobs):
                    yield pair
            finally:
                self._pending.difference_update(j.request_id for j in jobs)
            return
        unfinished = {j.request_id for j in jobs}
        gens = [self._run_one(j, priority) for j in jobs]
        try:
            if len(gens) == 1:
                async with contextlib.aclosing(gens[0]) as g:
                    async for out in g:
                        if out.finished:
                            unfinished.discard(out.request_id)
                        yield jobs[0], out
            else:
                async with contextlib.aclosing(merge_streams(gens)) as merged:
                    async for i, out in merged:
                        if out.finished:
                            unfinished.discard(out.request_id)
                        yield jobs[i], out
        finally:
            for j in jobs:
                self._pending.discard(j.request_id)
            with anyio.CancelScope(shield=True):
                for rid in unfinished:
                    await self.engine.abort(rid)

    # --- responses --------------------------------------------------------------------------------------------

    def response_model(self, jobs: list[_Job]) -> str:
        return jobs[0].lora.lora_name if jobs and jobs[0].lora is not None else self.model_name

    async def respond(self, raw: Request, kind: str, request_id: str, jobs: list[_Job], priority: int,
                      body: P._SamplingFields, echo: bool, num_top: int | None,
                      chat: ChatMode | None = None, reshape=None) -> Response:
        """`reshape` (the Responses API's `ResponseShape`) turns the chat completion, or its chunks, into its own."""
        self.admit(jobs)
        if self.log_requests:
            self.log_request(request_id, jobs)
        as_ids = body.return_tokens_as_token_ids
        fmt = self.lp_ids if (self.tokens_as_ids if as_ids is None else as_ids) else self.lp
        reply = shaping.Reply(kind, request_id, self.response_model(jobs), fmt, echo, num_top, chat,
                              self.response_role, body.prompt_logprobs is not None, body.return_token_ids)
        if body.stream:
            events = shaping.stream(self.outputs(jobs, priority), reply, jobs, body.include_usage,
                                    body.continuous_usage)
            return StreamingResponse(events if reshape is None else reshape.stream(events),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        work = asyncio.ensure_future(shaping.collect(self.outputs(jobs, priority), reply, jobs))
        watch = asyncio.ensure_future(wait_for_disconnect(raw))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client left (or this handler was cancelled): abort its requests
                work.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            return Response(status_code=499)
        return JSONResponse(work.result() if reshape is None else reshape.whole(work.result()))


def build_app(engine, *, served_model_name: str | list[str], api_key: str | None = None,
              max_queue: int | None = None, model_root: str | None = None, tool_call_parser: str | None = None,
              response_role: str = "assistant", cors: dict | None = None, reasoning_parser: str | None = None,
              grammar_in_reasoning: bool = False, return_tokens_as_token_ids: bool = False,
              trust_request_chat_template: bool = False, log_stats_interval: float | None = None,
              log_requests: bool = False, max_log_len: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (an `AsyncLLM`) under `served_model_name`. `tool_call_parser` (with vLLM's
    --enable-auto-tool-choice): "auto" tool choice parses calls out of the text (engine/tools.py);
    `reasoning_parser` splits a thinking reply's reasoning off (engine/reasoning.py), its grammars held to the
    text after the thought unless `grammar_in_reasoning`. `return_tokens_as_token_ids`: logprobs name tokens
    "token_id:<id>" unless a request says otherwise. `trust_request_chat_template`: a chat request may bring its own
    template (rendered in jinja2's sandbox), else that is a 400. `cors`: CORSMiddleware's keyword arguments (vLLM's
    --allowed-origins etc.). `log_stats_interval`: seconds between the engine stats lines on stderr
    (engine/stats_log.py, logger "ie_jax.stats"; None: none). `log_requests`: each request's prompt (its first
    `max_log_len` characters and ids) and parameters, logger "ie_jax.requests"."""
    server = OpenAIServer(engine, served_model_name, api_key, max_queue, model_root, tool_call_parser, response_role,
                          reasoning_parser, grammar_in_reasoning, return_tokens_as_token_ids,
                          trust_request_chat_template, log_requests, max_log_len)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        log = None if log_stats_interval is None else \
            asyncio.ensure_future(StatsLog(engine.stats, log_stats_interval).run())
        try:
            yield
        finally:
            if log is not None:
                log.cancel()
                await asyncio.gather(log, return_exceptions=True)

    app = FastAPI(title="ie-jax OpenAI-compatible server", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(P.ServerError)
    async def _server_error(_, e: P.ServerError):
        return error_response(e.message, e.status, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return error_response(P.validation_message(e.errors()), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return error_response(str(e.detail), e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_, e: Exception):
        return error_response(f"{type(e).__name__}: {e}", 500)

    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
    if cors is not None:  # added last, so outermost: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, **cors)

    @app.get("/health")
    @app.api_route("/ping", methods=["GET", "POST"])  # SageMaker's health route, as vLLM serves it
    async def health():
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        import ie_jax
        return {"version": ie_jax.__version__}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """vLLM's route: forget the prefix cache's pages (between benchmark runs, after new weights). Only while no
        request holds pages: otherwise a 409 and nothing changes."""
        if not await engine.reset_prefix_cache():
            raise P.ServerError("the prefix cache can be reset only while no request is running", status=409)
        return {"reset": True}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        cards = [P.model_card(name, server.model_root, server.max_model_len) for name in server.aliases]
        cards += [P.model_card(r.lora_name, r.lora_path, server.max_model_len, parent=server.model_name)
                  for r in server.adapters().values()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):  # the openai client's models.retrieve
        card = next((c for c in (await models())["data"] if c["id"] == model), None)
        if card is None:
            raise P.ServerError(f"The model `{model}` does not exist.", status=404, param="model")
        return card

    if runtime_lora_updates():
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: P.LoadLoRAAdapterRequest):
            if body.lora_name in (*server.aliases, server.model_root) or body.lora_name in server.adapters():
                raise P.ServerError(f"The lora adapter '{body.lora_name}' has already been loaded.",
                                    param="lora_name")
            ids = [r.lora_int_id for r in server.adapters().values()]
            try:
                await engine.add_lora(LoRARequest(body.lora_name, max(ids, default=0) + 1, body.lora_path))
            except (ValueError, OSError) as e:
                raise P.ServerError(str(e), param="lora_path") from e
            return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: P.UnloadLoRAAdapterRequest):
            if body.lora_name not in server.adapters():
                raise P.ServerError(f"The lora adapter '{body.lora_name}' cannot be found.", status=404,
                                    param="lora_name")
            try:
                await engine.remove_lora(body.lora_name)
            except ValueError as e:
                raise P.ServerError(str(e), param="lora_name") from e
            return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
                            media_type="text/plain")

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, raw: Request):
        lora = server.check_model(body.model)
        if body.suffix:
            raise P.ServerError("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise P.ServerError(f"best_of={body.best_of} is not supported (only best_of == n)", param="best_of")
        if body.max_tokens == 0 and not body.echo:
            raise P.ServerError("max_tokens=0 returns nothing without echo=true", param="max_tokens")
        # echo with logprobs: the prompt tokens' logprobs too (how lm-evaluation-harness scores text); with
        # max_tokens=0, only those. vLLM's prompt_logprobs asks for them in a field of their own.
        prompt_logprobs = body.num_prompt_logprobs(server.engine.model_config.vocab_size, server.max_logprobs)
        if prompt_logprobs is None and body.echo:
            prompt_logprobs = body.logprobs
        prompts, params = [], []
        for prompt in body.prompts():
            whole = server.encode(prompt, body.add_special_tokens)
            ids = body.truncated(whole, server.max_model_len)
            max_tokens = server.max_tokens(len(ids), body.max_tokens, "prompt")
            try:
                sp = body.sampling_params(max(max_tokens, 1), body.logprobs, server.default_sampling)
                params.append(dataclasses.replace(sp, prompt_logprobs=prompt_logprobs))
                text = prompt if isinstance(prompt, str) and len(ids) == len(whole) else \
                    server.tokenizer.decode(ids, skip_special_tokens=False)
            except ValueError as e:
                raise P.ServerError(str(e)) from e
            prompts.append((ids, text))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        beams = [body.beam_params(p.max_tokens, server.max_logprobs) for p in params]
        jobs = server.jobs(request_id, prompts, params, score_only=body.max_tokens == 0, lora=lora, beams=beams,
                           echo=body.echo)
        return await server.respond(raw, "text_completion", request_id, jobs, body.priority, body, body.echo,
                                    body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, raw: Request):
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        jobs, chat, num_top = server.chat_jobs(body, request_id)
        return await server.respond(raw, "chat.completion", request_id, jobs, body.priority, body, False, num_top,
                                    chat)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, raw: Request):
        """OpenAI's Responses API over the chat path (engine/responses.py)."""
        as_chat, request_id = body.as_chat(), f"resp_{uuid.uuid4().hex}"
        jobs, chat, num_top = server.chat_jobs(as_chat, request_id)
        return await server.respond(raw, "chat.completion", request_id, jobs, as_chat.priority, as_chat, False,
                                    num_top, chat, ResponseShape(body, request_id, server.response_model(jobs)))

    @app.post("/v1/embeddings")
    async def embeddings(body: P.EmbeddingRequest):
        """Each input's pooled hidden states (engine/pooling.py; --pooler-config), as vLLM's pooling runner serves
        them."""
        if body.dimensions is not None:
            raise P.ServerError(f"Model \"{server.model_name}\" does not support matryoshka representation, changing "
                                f"output dimensions will lead to poor results.", param="dimensions")
        vectors, ids = await server.embed(body.inputs(), body, "embedding generation")
        return P.embedding_response(f"embd-{uuid.uuid4().hex}", server.model_name, vectors, body.encoding_format,
                                    sum(map(len, ids)))

    @app.post("/invocations")
    async def invocations(raw: Request):
        """SageMaker's inference route, as vLLM serves it: a chat body ("messages") goes to chat completions, a
        completion body ("prompt") to completions."""
        try:
            data = await raw.json()
        except ValueError as e:
            raise P.ServerError(f"the request body is not JSON: {e}") from e
        kind = next((k for k in ("messages", "prompt") if isinstance(data, dict) and k in data), None)
        if kind is None:
            raise P.ServerError("/invocations takes a chat completion body (with \"messages\") or a completion body "
                                "(with \"prompt\")")
        model = P.ChatCompletionRequest if kind == "messages" else P.CompletionRequest
        try:
            body = model.model_validate(data)
        except pydantic.ValidationError as e:
            raise P.ServerError(P.validation_message(e.errors())) from e
        return await (chat_completions if kind == "messages" else completions)(body, raw)

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        server.check_model(body.model)
        try:
            if body.messages is not None:
                ids = server.tokenizer.apply_chat_template(
                    [m.as_template_dict() for m in body.messages],
                    add_generation_prompt=body.add_generation_prompt, tokenize=True)
            elif body.prompt is not None:
                ids = server.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            else:
                raise P.ServerError("either prompt or messages is required", param="prompt")
        except ValueError as e:
            raise P.ServerError(str(e)) from e
        strs = [server.lp.token_str(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        server.check_model(body.model)
        try:
            return {"prompt": server.tokenizer.decode(body.tokens, skip_special_tokens=False)}
        except ValueError as e:
            raise P.ServerError(str(e), param="tokens") from e

    add_scoring_routes(app, server)  # /score, /rerank (engine/scoring_routes.py)
    return app


def run_server(args) -> None:
    """Build the engine from parsed `scripts/serve.py` flags and serve until interrupted."""
    import uvicorn

    from engine.async_llm import AsyncLLM
    from engine.serve_flags import app_kwargs

    engine = AsyncLLM.from_args(args)
    log_to_stderr()
    try:
        app = build_app(engine, **app_kwargs(args))
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, timeout_keep_alive=5)
    finally:
        engine.shutdown()
