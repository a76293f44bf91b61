"""`LLM`: offline batch generation over the engine, vLLM's front end for scripts and benchmarks.

    llm = LLM("path/to/hf_dir" or preset, max_num_seqs=64)
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))

    llm = LLM("path/to/hf_dir", enable_lora=True, max_loras=2, max_lora_rank=16)
    outs = llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "path/to/peft_adapter"))

Prompts given no SamplingParams get `get_default_sampling_params()`: the checkpoint's generation_config.json
defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) over SamplingParams' own, as vLLM
applies them; `generation_config="vllm"` ignores the file, and `override_generation_config` goes over it.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from flax import nnx
from tqdm.auto import tqdm

import ie_jax
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, frozen_heap
from engine.lora import LoRARequest
from engine.runner import row_variant
from ie_jax.generate import CompletionOutput, GenerateOutput
from ie_jax.sampling import SamplingParams, model_sampling_defaults


class LLM:
    def __init__(self, model: str | nnx.Module = "default", *, tokenizer=None, dtype="auto", load_format="auto",
                 seed: int = 0, progress: bool = True, quantization: str | None = None, generation_config: str = "auto",
                 override_generation_config: dict | None = None, **engine_args):
        owns_model = not isinstance(model, nnx.Module)
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

    def get_default_sampling_params(self) -> SamplingParams:
        """What a prompt given no SamplingParams runs with: the generation_config defaults over SamplingParams()."""
        return SamplingParams(**self.default_sampling)

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams | None] | None = None, *,
                 use_tqdm: bool = True, lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
                 ) -> list[GenerateOutput]:
        """Run every prompt to completion; outputs are in prompt order (n > 1 gives n completions each).
        `lora_request`: one adapter for every prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
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
        for i, (prompt, p, lora) in enumerate(zip(prompts, params, loras)):
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
        results = [GenerateOutput(prompt if isinstance(prompt, str) else None, self.engine.encode(prompt), outs, lps)
                   for prompt, outs, lps in zip(prompts, completions, prompt_lps)]
        return results
