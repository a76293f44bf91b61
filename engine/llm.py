"""`LLM`: offline batch generation over the engine, vLLM's front end for scripts and benchmarks.

    llm = LLM("path/to/hf_dir" or preset, max_num_seqs=64)
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))
    outs = llm.generate([{"prompt": "Hello"}, {"prompt_token_ids": [1, 15043]}])  # vLLM's TextPrompt / TokensPrompt
    outs = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))  # or a list of chats
    outs = llm.beam_search(["The capital of France is"], BeamSearchParams(beam_width=4, max_tokens=16))
    vecs = llm.embed(["a sentence", "another"])  # [o.outputs.embedding ...]: pooled hidden states (pooler_config)

    llm = LLM("path/to/hf_dir", enable_lora=True, max_loras=2, max_lora_rank=16)
    outs = llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "path/to/peft_adapter"))

Prompts given no SamplingParams get `get_default_sampling_params()`: the checkpoint's generation_config.json
defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) over SamplingParams' own, as vLLM
applies them; `generation_config="vllm"` ignores the file, and `override_generation_config` goes over it.

`chat` renders each conversation with the tokenizer's chat template (or `chat_template=`) as the server's
/v1/chat/completions does, then generates from the rendered ids; an output's `prompt` is the rendered text. Prompt
dicts take only "prompt" or "prompt_token_ids": multimodal data, cache salts and the like are refused by name.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx
from tqdm.auto import tqdm

import ie_jax
from engine import beam_search as beam
from engine.beam_search import BeamSearchOutput, BeamSearchParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, frozen_heap
from engine.lora import LoRARequest
from engine.pooling import pair_texts, unit_rows
from engine.variants import row_variant
from ie_jax.chat_template import content_text, continue_final
from ie_jax.generate import CompletionOutput, GenerateOutput
from ie_jax.hub import resolve_model
from ie_jax.sampling import SamplingParams, model_sampling_defaults


# One prompt as vLLM's LLM.generate takes it: text, token ids, {"prompt": text} or {"prompt_token_ids": ids}.
PromptType = str | Sequence[int] | Mapping[str, Any]
PROMPT_KEYS = ("prompt", "prompt_token_ids")


def parse_prompt(prompt: PromptType) -> tuple[str | None, str | list[int]]:
    """(the prompt's text where it has one, what the engine encodes) for one of vLLM's prompt forms."""
    if not isinstance(prompt, Mapping):
        return (prompt if isinstance(prompt, str) else None), prompt
    unsupported = [k for k in prompt if k not in PROMPT_KEYS]
    if unsupported:
        raise ValueError(f"prompt key {unsupported[0]!r} is not supported: a prompt dict holds 'prompt' (text) or "
                         f"'prompt_token_ids'")
    if len(prompt) != 1:
        raise ValueError(f"a prompt dict holds exactly one of 'prompt' and 'prompt_token_ids', got keys {list(prompt)}")
    if "prompt" in prompt:
        text = prompt["prompt"]
        if not isinstance(text, str):
            raise ValueError(f"prompt key 'prompt' must be a str, got {type(text).__name__}")
        return text, text
    ids = prompt["prompt_token_ids"]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"prompt key 'prompt_token_ids' must be a list of ints, got {type(ids).__name__}")
    return None, list(ids)


@dataclasses.dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclasses.dataclass
class EmbeddingRequestOutput:
    """One prompt's embedding, as vLLM's LLM.embed gives it."""
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput


@dataclasses.dataclass
class ScoringOutput:
    score: float


@dataclasses.dataclass
class ScoringRequestOutput:
    """One pair's score, as vLLM's LLM.score gives it: `.outputs.score`."""
    prompt_token_ids: list[int]  # text_1's, then text_2's
    outputs: ScoringOutput


def template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A chat message as templates read it: content parts joined into one string, as the server joins them."""
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"chat message {message!r} must be a dict with 'role' and 'content'")
    return {**message, "content": content_text(message.get("content"))}


class LLM:
    def __init__(self, model: str | nnx.Module = "default", *, tokenizer=None, dtype="auto", load_format="auto",
                 seed: int = 0, progress: bool = True, quantization: str | None = None, generation_config: str = "auto",
                 override_generation_config: dict | None = None, revision: str | None = None,
                 download_dir: str | None = None, **engine_args):
        owns_model = not isinstance(model, nnx.Module)
        if owns_model:  # a Hub name: fetched now, so that its generation_config is read too
            model = resolve_model(model, weights=load_format != "dummy", revision=revision, download_dir=download_dir)
        self.default_sampling = model_sampling_defaults(model if owns_model else None, generation_config,
                                                        override_generation_config)  # checked before loading
        if not owns_model:
            self.model, self.tokenizer = model, tokenizer
        else:
            self.model, loaded = ie_jax.load_model(model, dtype=dtype, load_format=load_format, seed=seed,
                                                   progress=progress, quantization=quantization)
            self.tokenizer = tokenizer or loaded
        self.engine = LLMEngine(self.model, self.tokenizer, EngineConfig(seed=seed, **engine_args),
                                progress=progress, owns_model=owns_model)
        self._ids = itertools.count()

    def get_tokenizer(self):
        """The tokenizer prompts are encoded with (vLLM's LLM.get_tokenizer), e.g. for its chat template."""
        return self.tokenizer

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for the engine under this front end."""
        return self.engine

    def get_default_sampling_params(self) -> SamplingParams:
        """What a prompt given no SamplingParams runs with: the generation_config defaults over SamplingParams()."""
        return SamplingParams(**self.default_sampling)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams | None] | None = None, *,
                 use_tqdm: bool = True, lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
                 ) -> list[GenerateOutput]:
        """Run every prompt to completion; outputs are in prompt order (n > 1 gives n completions each).
        A prompt is text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids}.
        `lora_request`: one adapter for every prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, (str, Mapping)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._generate([parse_prompt(p) for p in prompts], sampling_params, use_tqdm, lora_request)

    def embed(self, prompts: PromptType | Sequence[PromptType], *, truncate_prompt_tokens: int | None = None
              ) -> list[EmbeddingRequestOutput]:
        """Each prompt's embedding (engine/pooling.py: the final hidden states pooled as the engine's pooler_config
        says, LAST and normalized by default), as vLLM's LLM.embed returns them: `.outputs.embedding`.
        `truncate_prompt_tokens` keeps each prompt's last k tokens."""
        if isinstance(prompts, (str, Mapping)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        parsed = [parse_prompt(p) for p in prompts]
        ids = [self.engine.encode(x) for _, x in parsed]
        if truncate_prompt_tokens is not None:
            if truncate_prompt_tokens < 1:
                raise ValueError(f"{truncate_prompt_tokens=} must be at least 1")
            ids = [x[-truncate_prompt_tokens:] for x in ids]
        vectors = self.engine.embed(ids)
        return [EmbeddingRequestOutput(text, x, EmbeddingOutput(v.tolist())) for (text, _), x, v in
                zip(parsed, ids, vectors)]

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str], *,
              truncate_prompt_tokens: int | None = None) -> list[ScoringRequestOutput]:
        """vLLM's LLM.score for an embedding model: each pair's cosine similarity of the two texts' embeddings. One
        text_1 is paired with each text_2, two lists entry by entry (`pooling.pair_texts`, as /v1/score)."""
        both = pair_texts(text_1, text_2)
        out = self.embed([t for pair in both for t in pair], truncate_prompt_tokens=truncate_prompt_tokens)
        unit = unit_rows([o.outputs.embedding for o in out])
        scores = (unit[0::2] * unit[1::2]).sum(-1)
        return [ScoringRequestOutput(a.prompt_token_ids + b.prompt_token_ids, ScoringOutput(float(s)))
                for a, b, s in zip(out[0::2], out[1::2], scores)]

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache's pages (vLLM's LLM.reset_prefix_cache), e.g. to time without hits."""
        return self.engine.reset_prefix_cache()

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams, *,
                    lora_request: LoRARequest | None = None) -> list[BeamSearchOutput]:
        """Beam search for each prompt (engine/beam_search.py): its best `beam_width` sequences, best first, each
        with its tokens (the prompt's included, as vLLM returns them), text, logprobs and cumulative logprob."""
        if isinstance(prompts, (str, Mapping)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.engine.encode(prompt) for _, prompt in map(parse_prompt, prompts)]
        if self.engine.has_unfinished_requests():
            raise RuntimeError("beam_search runs the engine's own loop: finish the requests in flight first")
        variant = row_variant(beam.round_params(params), self.engine.model_config.vocab_size)
        self.engine.runner.ensure_variants({variant}, progress=False)
        return beam.run(self.engine, ids, params, lora_request)

    def chat(self, messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams | None] | None = None, *,
             use_tqdm: bool = True, lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[GenerateOutput]:
        """Generate a reply to one conversation (a list of {"role", "content"} dicts) or to each of a list of them.

        Each renders through the tokenizer's chat template, or `chat_template` (a template name or the template
        itself), with `tools` and `chat_template_kwargs` (which, as in vLLM, may also override the named
        arguments). `continue_final_message` (with add_generation_prompt=False) extends the last message instead
        of starting a new one. Outputs are `generate`'s, with the rendered text as `prompt`."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: chat needs one with a chat template")
        if not messages:
            raise ValueError("messages cannot be empty")
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        options = {"chat_template": chat_template, "add_generation_prompt": add_generation_prompt,
                   "continue_final_message": continue_final_message, "tools": tools, **(chat_template_kwargs or {})}
        add_generation_prompt = options.pop("add_generation_prompt")
        continue_final_message = options.pop("continue_final_message")
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message=True extends the last message and add_generation_prompt=True "
                             "starts a new one: pass add_generation_prompt=False")
        if options.get("chat_template") is None:
            options.pop("chat_template", None)
        if not options.get("tools"):  # as the server: the template sees `tools` only when some are given
            options.pop("tools", None)
        prompts = []
        for conversation in conversations:
            if not conversation:
                raise ValueError("a conversation cannot be empty")
            conversation = [template_message(m) for m in conversation]
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **options)
            if continue_final_message:
                text = continue_final(text, conversation[-1]["content"])
            # the template wrote BOS where it wants one, as apply_chat_template(tokenize=True) encodes it
            prompts.append((text, self.tokenizer.encode(text, add_special_tokens=False)))
        return self._generate(prompts, sampling_params, use_tqdm, lora_request)

    def _generate(self, prompts: list[tuple[str | None, str | list[int]]],
                  sampling_params: SamplingParams | Sequence[SamplingParams | None] | None,
                  use_tqdm: bool, lora_request: LoRARequest | Sequence[LoRARequest | None] | None
                  ) -> list[GenerateOutput]:
        """`generate` over parsed prompts: (the text to report or None, the text or ids the engine encodes)."""
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        params = [self.get_default_sampling_params() if p is None else p for p in params]
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        loras = lora_request if isinstance(lora_request, Sequence) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts")
        # The step variants these requests can use (a step's is the costliest of its rows'), compiled now if
        # missing: the sampling loop below then never compiles.
        vocab = self.engine.model_config.vocab_size
        self.engine.runner.ensure_variants({row_variant(p, vocab) for p in params}, progress=use_tqdm)
        batch = next(self._ids)
        rows, pieces = {}, {}  # request id -> (prompt index, its completion); the completion's text pieces
        prompt_lps = [None] * len(prompts)
        for i, ((_, prompt), p, lora) in enumerate(zip(prompts, params, loras)):
            for j in range(p.n):
                seed = None if p.seed is None else (p.seed + 7919 * j) % 2**32  # as ie_jax.generate derives them
                # the prompt's logprobs are the same for every choice: only the first asks for them
                child = dataclasses.replace(p, n=1, seed=seed, prompt_logprobs=p.prompt_logprobs if j == 0 else None)
                rid = f"{batch}-{i}-{j}"
                self.engine.add_request(rid, prompt, child, lora_request=lora)
                rows[rid] = (i, CompletionOutput(j, "", [], "length", [] if p.logprobs is not None else None))
                pieces[rid] = []
        bar = tqdm(total=len(rows), desc="generating", unit="req", disable=not use_tqdm, leave=False)
        with frozen_heap():
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    c = rows[out.request_id][1]
                    c.token_ids += out.new_token_ids
                    pieces[out.request_id].append(out.new_text)
                    if out.prompt_logprobs is not None:
                        prompt_lps[rows[out.request_id][0]] = out.prompt_logprobs
                    if c.logprobs is not None:
                        c.logprobs += out.new_logprobs or []
                    if out.finished:
                        c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
                        bar.update()
        bar.close()
        completions = [[] for _ in prompts]
        for rid, (i, c) in rows.items():
            c.text = "".join(pieces[rid])
            completions[i].append(c)
        return [GenerateOutput(text, self.engine.encode(prompt), outs, lps)
                for (text, prompt), outs, lps in zip(prompts, completions, prompt_lps)]
