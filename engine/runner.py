"""The model runner: owns the device, the paged KV cache and the one jitted step.

For each step it flattens the scheduled tokens into fixed-shape arrays (padded up to a precompiled (T, R) bucket),
calls `step(params, caches, penalty state, inputs)` with the caches donated, and samples on device. The host reads
back only the sampled ids (and logprobs when a request asked for them).

Penalty state lives on device, one row per *slot* (a seat a running request holds): output token counts and the
prompt-token mask, [max_num_seqs + 1, V] (the last row is scratch for padding rows). Rows are filled only for
requests that use penalties; for the others the penalties are neutral (1.0 / 0.0), so stale rows do nothing.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from engine.config import (STEP_COMPILER_OPTIONS, EngineConfig, parse_xla_options, pow2_bucket,  # noqa: F401
                           step_compiler_options)
from engine.lora import AdapterWeights, add_adapter_slots, empty_adapter, slot_leaves, write_adapter
from engine.request import Request
from engine.scheduler import SchedulerOutput
from engine.slot_tables import SlotTables
from engine.step_inputs import NUM_BANNED, SlotState, StepInputs
from engine.variants import CHAIN, DECODE, FALLBACK, VARIANTS  # noqa: F401 (FALLBACK: named in docstrings)
from ie_jax.generate import prompt_logprob_entry
from ie_jax.models.context import DenseCausal, Paged
from ie_jax.models.llama import fuse_projections
from ie_jax.quant import kv_scales
from ie_jax.sampling import SamplingTensors, sample
from kernels_pallas import ops

def _step(graphdef, state, caches, counts, last_tokens, tables, packed, layout: tuple, num_logprobs: int,
          sample_mode: str, decode_only: bool = False, layer_states=None):
    # tables: the per-slot sampling rows the step reads (engine/slot_tables.py): prompt mask [S, V], logit-bias
    # ids and values [S, NB], allowed-token bitmask [S, ceil(V / 32)]
    prompt_mask, bias_ids, bias_values, allowed_bits = tables
    inp = StepInputs.unpack(packed, layout)
    # Decode inputs sampled by the previous step never visit the host: they are read from last_tokens on device.
    input_ids = jnp.where(inp.from_slot >= 0, last_tokens[jnp.maximum(inp.from_slot, 0)], inp.input_ids)
    # caches: (kv,) with kv the interleaved [2L, K, P, page_size, H] buffer (layer l's K at 2l, V at 2l + 1), or
    # (kv, k_scale, v_scale) for an fp8 cache (the scales pass through unchanged)
    # decode_only (static): every request of the step has one token, so attention may take the decode kernel
    ctx = Paged(caches[0], None, inp.slot_mapping, inp.page_table, inp.query_start_loc, inp.seq_lens,
                inp.num_seqs, *caches[1:], lora_slots=inp.lora_slots, decode_only=decode_only)
    model = nnx.merge(graphdef, state)
    logits, ctx = model(input_ids[None], inp.positions[None], ctx, logits_indices=inp.logits_indices[None],
                        layer_states=layer_states)
    t = SamplingTensors(inp.temperature, inp.top_k, inp.top_p, inp.min_p, inp.repetition_penalty,
                        inp.presence_penalty, inp.frequency_penalty, inp.seeds, inp.step, counts[inp.slots],
                        prompt_mask[inp.slots], inp.suppress_eos, inp.eos_ids, bias_ids[inp.slots],
                        bias_values[inp.slots],
                        # the guide masks: only "full" steps read them (guided rows take "full", row_variant), so
                        # the cheaper variants never pay for unpacking [R, V] bits
                        allowed_bits[inp.slots] if num_logprobs is not None and sample_mode == "sample" else None)
    out = sample(logits[0], t, num_logprobs, sample_mode)
    counts = counts.at[inp.slots, out.token_ids].add(inp.sample_mask.astype(counts.dtype))
    last_tokens = last_tokens.at[inp.slots].set(jnp.where(inp.sample_mask, out.token_ids, last_tokens[inp.slots]))
    return (ctx.k, *caches[1:]), counts, last_tokens, out


# Lowering is serialized; only XLA's compile runs on several threads. Mosaic GPU's kernel emitter keeps
# process-global state while it lowers (which thread subset the code being emitted runs on), so two kernels
# lowered at once can leak that state into each other: a wrong kernel, and a compilation-cache key that differs
# from run to run. Lowering is a small part of start-up once the layers are one nested jit.
_LOWERING_LOCK = threading.Lock()

def _step_flat(graphdef, weights_tree, caches, counts, last_tokens, tables, packed, layout: tuple,
               num_logprobs: int, sample_mode: str, decode_only: bool, *weights):
    """`_step` with the weights as a flat list of arrays (`weights_tree` rebuilds (state, layer_states)): a
    compiled call then takes its ~200-500 weight arguments on the C++ path, instead of flattening nnx States in
    Python every step (measured on CPU: 0.2 against 0.6-1.5 ms a call; the H200 host's dispatch was 2.0 ms per
    batch-1 step with bf16 weights and 4.1 ms with fp8 ones)."""
    state, layer_states = jax.tree.unflatten(weights_tree, weights)
    return _step(graphdef, state, caches, counts, last_tokens, tables, packed, layout, num_logprobs,
                 sample_mode, decode_only, layer_states)


def _score_flat(graphdef, weights_tree, num_top: int, token_ids, lora_slots, *weights):
    """Prompt logprobs: one dense causal forward over token_ids [1, L] (padding after the prompt changes nothing
    before it), under the LoRA slot of each token (lora_slots [L], or None without adapters). Returns each next
    token's logprob [L - 1], the top `num_top` ids and logprobs [L - 1, num_top] and each token's rank [L - 1] (how
    many tokens are at least as likely), all from the raw logits in f32;
    the log-softmax itself is never materialised ([L, V] logits are the peak)."""
    state, layer_states = jax.tree.unflatten(weights_tree, weights)
    ctx = DenseCausal(lora_slots=lora_slots)
    logits, _ = nnx.merge(graphdef, state)(token_ids, ctx=ctx, layer_states=layer_states)
    logits = logits[0, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    token_logit = jnp.take_along_axis(logits, token_ids[0, 1:, None], axis=-1)
    rank = (logits >= token_logit).sum(axis=-1, dtype=jnp.int32)  # 1 for the likeliest
    top_lp, top_ids = jax.lax.top_k(logits, num_top)
    return token_logit[:, 0] - lse, top_ids, top_lp - lse[:, None], rank


# _step_flat's static arguments: graphdef, weights_tree, input layout, num_logprobs, sample mode, decode_only
STEP_STATIC_ARGNUMS = (0, 1, 7, 8, 9, 10)

_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
                 "/jax/compilation_cache/cache_misses": "cache_misses"}
_cache_counts = {"cache_hits": 0, "cache_misses": 0}  # persistent compilation cache lookups in this process


def _count_cache_event(event: str, **_) -> None:
    if event in _CACHE_EVENTS:
        _cache_counts[_CACHE_EVENTS[event]] += 1


jax.monitoring.register_event_listener(_count_cache_event)


def unstack_layers(model: nnx.Module, *, release: bool) -> tuple:
    """The model's stacked decoder layers as one state per layer (separate arrays). With `release` the stacked
    variables are replaced by empty arrays, so their memory is freed once nothing else holds them."""
    stack = getattr(model, model.STACK)
    state = nnx.state(stack)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    take = jax.jit(lambda s, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), s))
    layer_states = tuple(take(state, jnp.int32(i)) for i in range(num_layers))
    if release:
        nnx.update(stack, jax.tree.map(lambda a: jnp.zeros((0,) + a.shape[1:], a.dtype), state))
    return layer_states


def pages_that_fit(stats: dict, utilization: float, weight_bytes: int, headroom: int, page_bytes: int) -> int:
    """KV pages for a device whose allocator reports `stats` (`Device.memory_stats()`): `utilization` of the
    allocator's limit, less what is in use (at least the weights) and the steps' headroom, and never more than its
    largest free block, since the cache is one buffer. Loading can leave holes (the stacked layer weights are freed
    after their per-layer copies were made beside them), so the free total may not be one block."""
    in_use = max(stats.get("bytes_in_use", 0), weight_bytes)
    free = stats["bytes_limit"] * utilization - in_use - headroom
    if "largest_free_block_bytes" in stats:
        free = min(free, stats["largest_free_block_bytes"] - 2**28)  # 256 MiB spare in the block
    return max(int(free // page_bytes), 0)


class ModelRunner:
    def __init__(self, model: nnx.Module, config: EngineConfig, *, cache_dtype=None, owns_model: bool = False,
                 kv_cache_scales=None):
        """`owns_model`: the runner may restructure the model in place: projections that share an input are fused
        into one Linear (q/k/v, gate/up: one GEMM each) and, with config.unroll_layers, the stacked layer weights
        are taken apart and released, leaving the model object's layers empty. Otherwise the runner works on a
        copy and the model stays usable (tests, a model shared with other code), at the cost of its weights'
        memory. `kv_cache_scales`: an fp8 cache's per-layer (k, v) scales in place of the model's own
        (ie_jax/quant/kv_scales.py)."""
        self.config = cfg = config
        self.model_config = mc = model.config
        if not owns_model:  # the step runs a restructured copy; the caller's model stays as it was
            model = nnx.clone(model)
        fuse_projections(model)
        # LoRA: every decoder linear layer gets max_loras adapter slots (engine/lora.py)
        self.lora_layout = add_adapter_slots(model, cfg.max_loras, cfg.max_lora_rank) if cfg.enable_lora else {}
        self.layer_states = unstack_layers(model, release=True) if cfg.unroll_layers else None
        self.graphdef, state = nnx.split(model)
        # the step's weight arguments, one flat list (`_step_flat`); the first is the embedding
        leaves, self.weights_tree = jax.tree_util.tree_flatten_with_path((state, self.layer_states))
        self.weights = [x for _, x in leaves]
        self.lora_leaves = slot_leaves(leaves, model.STACK) if cfg.enable_lora else {}
        if self.lora_leaves:  # compiles the slot writers now, not when the first adapter arrives mid-serving
            self.load_adapter(0, empty_adapter(self.lora_layout, cfg.max_lora_rank, self.weights[0].dtype))
        fp8 = jnp.float8_e4m3fn
        self.dtype = cache_dtype or (fp8 if cfg.fp8_kv_cache else self.weights[0].dtype)
        self.page_bytes = 2 * mc.num_layers * mc.num_kv_heads * cfg.page_size * mc.head_dim * \
            jnp.dtype(self.dtype).itemsize
        self.memory_at_sizing: dict[str, int] = {}  # the allocator's figures the KV pages were sized from (GPU)
        self.num_pages = cfg.num_pages or self._pages_from_memory()
        # K and V of every layer in one buffer, K of layer l at entry 2l and V at 2l + 1: a step writes both with
        # one scatter per layer (two would be two kernels of ~3 us each at batch 1 on the H200).
        shape = (2 * mc.num_layers, mc.num_kv_heads, self.num_pages, cfg.page_size, mc.head_dim)
        # Committed to the device up front, as the step's outputs will be: otherwise the first call after warm-up
        # would see a different argument signature and compile again.
        self.device = device = jax.devices()[0]
        caches = [jnp.zeros(shape, self.dtype)]
        if self.dtype == fp8:  # static per-(layer, kv-head) scales: the checkpoint's (ie_jax/quant/kv_scales.py) or 1
            caches += list(kv_scales.cache_scales(model, mc.num_kv_heads, kv_cache_scales))
        self.caches = tuple(jax.device_put(c, device) for c in caches)
        V, S = mc.vocab_size, cfg.max_num_seqs + 1
        self.counts = jax.device_put(jnp.zeros((S, V), jnp.int32), device)
        self.tables = SlotTables(S, V, device)  # read-only in the step: prompt mask, logit bias, guide masks
        self.last_tokens = jax.device_put(jnp.zeros((S,), jnp.int32), device)
        self.free_slots = list(range(cfg.max_num_seqs))
        self.slot_of: dict[str, int] = {}
        self.slot_state = SlotState.empty(S, cfg.max_pages_per_seq)  # host side, by slot (row S - 1: padding)
        # Donated: the KV cache, penalty counts and last tokens are updated in place each step, never copied.
        quant = mc.quantization
        self.compiler_options = step_compiler_options(fp8_weights=quant is not None and quant.method == "fp8")
        self._step = jax.jit(_step_flat, static_argnums=STEP_STATIC_ARGNUMS, donate_argnums=(2, 3, 4),
                             compiler_options=self.compiler_options)
        self.executables: dict[tuple[int, int, str], jax.stages.Compiled] = {}  # (T, R, variant)
        self._score = jax.jit(_score_flat, static_argnums=(0, 1, 2),  # compiled per prompt-length bucket
                              compiler_options=self.compiler_options)
        # decode twins (DECODE) of the decode-sized buckets' variants: where the paged kernel runs, or as configured
        self.decode_steps = ops.paged_kernel_active() if cfg.decode_steps is None else cfg.decode_steps
        self.last_variant = ""  # the executable variant `run` dispatched last
        self.extras_thread: threading.Thread | None = None  # compiles the cheaper variants (warmup, background)
        # Seconds summed over warm-up's worker threads (trace + lower, XLA compile or cache load) and the
        # persistent compilation cache's hits / misses, for the start-up log.
        self.warmup_times = {"lower": 0.0, "compile": 0.0, "prime": 0.0, "cache_hits": 0, "cache_misses": 0}
        # Executables that have run once (`prime`). The server leaves them to its idle time (`prime_next`);
        # offline warm-up runs each one before returning.
        self.primed: set[tuple[int, int, str]] = set()
        self.priming = self.device.platform != "cpu"  # the CPU's first runs cost little
        self.defer_priming = False
        self._set_row = jax.jit(lambda a, i, row: a.at[i].set(row), donate_argnums=0)

    def _pages_from_memory(self) -> int:
        cfg = self.config
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:  # CPU: enough pages for every seat at full length
            return cfg.max_num_seqs * cfg.max_pages_per_seq
        pages = pages_that_fit(stats, cfg.gpu_memory_utilization, sum(x.nbytes for x in self.weights),
                               self.step_headroom(), self.page_bytes)
        self.memory_at_sizing = {k: stats[k] for k in ("bytes_limit", "bytes_in_use", "largest_free_block_bytes")
                                 if k in stats}
        if pages < cfg.max_pages_per_seq:
            raise ValueError(f"only {pages} KV pages fit in memory (gpu_memory_utilization="
                             f"{cfg.gpu_memory_utilization}); one max_model_len={cfg.max_model_len} request needs "
                             f"{cfg.max_pages_per_seq}. Lower --max-model-len or raise --gpu-memory-utilization.")
        return pages

    def step_headroom(self) -> int:
        """Device memory kept free of KV pages for the steps' temporaries: twice the largest step's estimate, since
        step n+1 is launched while step n still holds its buffers. Too little makes the runtime wait for step n to
        free memory before it can launch step n+1 (the launch blocks, and host and device stop overlapping).

        Estimate (f32 upper bound): the widest per-token activations (MLP gate+up, q/k/v, residual) for the largest
        token bucket, plus about eight [R, V] sampler arrays (logits, log-softmax, sort keys/indices, noise, ...).
        `check_headroom` compares it with the compiled executables' own figure after warm-up.
        """
        mc = self.model_config
        T, R = max(self.config.buckets)
        per_token = 2 * mc.intermediate_size + (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim + 2 * mc.hidden_size
        step = 4 * (T * per_token + 8 * R * mc.vocab_size)
        return 2 * step + 2**30

    def check_headroom(self) -> None:
        """Warn when the compiled steps need more temporary memory than the KV-cache sizing left them."""
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats or self.config.num_pages is not None:
            return
        temp = max((e.memory_analysis().temp_size_in_bytes for e in self.executables.values()
                    if e.memory_analysis() is not None), default=0)
        if 2 * temp > self.step_headroom():
            warnings.warn(f"the largest step needs {temp / 2**30:.1f} GiB of temporaries (x2 with a step in flight) "
                          f"but only {self.step_headroom() / 2**30:.1f} GiB was left free of KV pages: launches may "
                          f"wait for memory. Lower --gpu-memory-utilization or set --num-pages.")

    # ------------------------------------------------------------------------------------------------------------
    def bucket(self, num_tokens: int) -> tuple[int, int]:
        for T, R in self.config.buckets:
            if T >= num_tokens:
                return T, R
        raise AssertionError(f"{num_tokens=} exceeds every bucket")

    def warmup(self, progress: bool = True, max_workers: int | None = None, background_extras: bool = False,
               extra_variants: tuple[str, ...] = ("greedy",)) -> None:
        """Compile every (T, R) bucket ahead of time, several at once (XLA compiles outside the GIL), so that
        serving never compiles: `run` calls only these executables and a shape outside them is an error.

        Every bucket gets the "full" sampler; decode-sized buckets (T <= max_num_seqs) also get `extra_variants`
        (VARIANTS), where the sampler's sort, log-softmax and top-k logprobs over the vocabulary would be a visible
        share of the step. Larger buckets are prefill-heavy steps, where they are not, so they skip them (start-up
        time: each executable costs a trace under the GIL even when the compilation cache has it).

        `background_extras` (the server): only the full-sampler executables are built before returning; the extra
        variants compile on a background thread and `run` picks each up once it exists. Until then their steps
        run the next variant that exists (FALLBACK), which gives the same tokens. The first runs (`prime`) are
        left to the engine loop's idle time too (`prime_next`), so that the server answers sooner."""
        self.defer_priming = background_extras
        keys = [(T, R, "full") for T, R in self.config.buckets]
        # "full" itself is in keys; naming it adds its decode twins. Offline generate skips them here: it compiles
        # the variants (and twins) its requests use before its first step (`ensure_variants`).
        extras = self._variant_keys((*(("full",) if background_extras else ()), *extra_variants))
        if not background_extras:
            keys, extras = keys + extras, []
        self._compile(keys, progress, max_workers)
        extras = [k for k in extras if k not in self.executables]
        if extras:
            def compile_extras():
                with ThreadPoolExecutor(2) as pool:
                    for key, executable, _ in pool.map(self._compile_key, extras):
                        self.executables[key] = executable  # one dict store: atomic for the engine thread

            self.extras_thread = threading.Thread(target=compile_extras, name="compile-variants", daemon=True)
            self.extras_thread.start()
        self.check_headroom()

    def ensure_variants(self, variants, progress: bool = True) -> None:
        """Compile now whichever of these variants the decode-sized buckets lack (offline generate: its requests
        are known up front, so it builds what they will use before the first step, and nothing compiles later)."""
        if self.extras_thread is not None:
            self.extras_thread.join()  # never compile a key twice
        self._compile([k for k in self._variant_keys(variants) if k not in self.executables], progress)

    def _variant_keys(self, variants) -> list[tuple[int, int, str]]:
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown step variants {sorted(unknown)}; expected some of {VARIANTS}")
        twins = (v + DECODE for v in variants) if self.decode_steps else ()
        # decode-sized: up to the bucket a step of max_num_seqs one-token requests runs in (with max_num_seqs
        # under the smallest bucket, that bucket: batch 1 decodes in T = 8)
        decode_T = self.bucket(self.config.max_num_seqs)[0]
        return [(T, R, v) for v in (*variants, *twins) if v != "full" for T, R in self.config.buckets
                if T <= decode_T]

    def _compile_key(self, key):
        T, R, variant = key
        base, _, decode = variant.partition("/")
        mode, num_logprobs = {"full": ("sample", self.config.max_logprobs), "greedy": ("argmax", 0),
                              "sort": ("sample", None), "draw": ("draw", None)}[base]
        args = (self.graphdef, self.weights_tree, self.caches, self.counts, self.last_tokens, self.tables.arrays)
        t0 = time.perf_counter()
        with _LOWERING_LOCK:
            inp = self._empty_inputs(T, R)
            lowered = self._step.lower(*args, inp.pack(), inp.layout(), num_logprobs, mode, bool(decode),
                                       *self.weights)
        t1 = time.perf_counter()
        executable = lowered.compile()
        return key, executable, (t1 - t0, time.perf_counter() - t1)

    def _compile(self, keys, progress: bool = True, max_workers: int | None = None) -> None:
        keys = [k for k in keys if k not in self.executables]
        if not keys:
            return
        workers = max_workers or int(os.environ.get("IE_JAX_COMPILE_WORKERS", min(8, os.cpu_count() or 1)))
        counts_before = dict(_cache_counts)
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(keys), desc="compiling step buckets",
                                                       disable=not progress, leave=False) as bar:
            for key, executable, (lower_s, compile_s) in pool.map(self._compile_key, keys):
                self.executables[key] = executable
                self.warmup_times["lower"] += lower_s
                self.warmup_times["compile"] += compile_s
                bar.update()
        for k in counts_before:
            self.warmup_times[k] += _cache_counts[k] - counts_before[k]
        if self.priming and not self.defer_priming:
            t0 = time.perf_counter()
            self.prime(keys)
            self.warmup_times["prime"] += time.perf_counter() - t0

    def prime(self, keys) -> None:
        """Run each of these executables once on all-padding inputs: no request, no KV write (every slot -1), no
        sample kept (every row's penalty slot out of range), so the state is unchanged. A first launch pays one-time
        costs (loading the kernels' modules): on the H200, the first 1,024-row decode step of Llama-3-8B took 0.41 s
        to dispatch, 3% of a 128/128 offline run. Offline warm-up pays them instead, the server its idle time
        (`prime_next`); GPU only, the CPU's are small."""
        for T, R, variant in keys:
            self._call(self.executables[(T, R, variant)], self._empty_inputs(T, R))
            self.primed.add((T, R, variant))
        jax.block_until_ready((self.caches, self.counts, self.last_tokens))

    def prime_next(self) -> bool:
        """The server's idle time: run the first compiled executable (smallest bucket first) that has not run yet,
        including the variants the background thread has finished since. Returns False when there was none, or
        on CPU, or where warm-up primed everything itself. Call it only from the thread that runs the steps."""
        if not (self.priming and self.defer_priming):
            return False
        pending = sorted(k for k in list(self.executables) if k not in self.primed)  # a snapshot: the extras
        if not pending:  # thread adds keys meanwhile
            return False
        t0 = time.perf_counter()
        self.prime(pending[:1])
        self.warmup_times["prime"] += time.perf_counter() - t0
        return True

    def _call(self, step, inp: StepInputs):
        """One step executable on these inputs; the caches, penalty counts and last tokens are donated and replaced
        by the step's own. Returns the device-side sample output."""
        self.caches, self.counts, self.last_tokens, res = step(self.caches, self.counts, self.last_tokens,
                                                              self.tables.arrays,
                                                              jax.device_put(inp.pack(), self.device),
                                                              *self.weights)
        return res

    def num_compiled(self) -> int:
        """Executables built so far (the jitted function's own cache stays empty: every call is ahead-of-time)."""
        return len(self.executables) + self._step._cache_size()

    def _empty_inputs(self, T: int, R: int) -> StepInputs:
        """Fresh all-padding host arrays (each field its own buffer: `prepare` fills them in place)."""
        i32, f32 = (lambda fill=0: np.full(R, fill, np.int32)), (lambda fill=0.0: np.full(R, fill, np.float32))
        return StepInputs(
            input_ids=np.zeros(T, np.int32), from_slot=np.full(T, -1, np.int32), positions=np.zeros(T, np.int32),
            slot_mapping=np.full(T, -1, np.int32),
            query_start_loc=np.zeros(R + 1, np.int32), seq_lens=i32(),
            page_table=np.zeros((R, self.config.max_pages_per_seq), np.int32), num_seqs=np.int32(0),
            logits_indices=i32(), slots=i32(self.config.max_num_seqs), sample_mask=np.zeros(R, bool),
            temperature=f32(), top_k=i32(), top_p=f32(1.0), min_p=f32(), repetition_penalty=f32(1.0),
            presence_penalty=f32(), frequency_penalty=f32(), seeds=np.zeros(R, np.uint32), step=i32(),
            suppress_eos=np.zeros(R, bool), eos_ids=np.full((R, NUM_BANNED), -1, np.int32),
            lora_slots=np.full(T, -1, np.int32))

    def score(self, token_ids: list[int], num_top: int,
              adapter: AdapterWeights | None = None) -> list[dict[int, float] | None]:
        """Prompt logprobs (SamplingParams.prompt_logprobs): per prompt token, None for the first, else
        {token: logprob} of the token and the top `num_top` at its position, with the token's rank
        (`TokenLogprobs`), as `ie_jax.generate.prompt_logprobs` gives. A dense forward outside the paged step,
        compiled once per power-of-two length bucket on first use (an opt-in request type, so start-up does not pay
        for it). Its peak is the [L, vocab] f32 logits, so L is
        capped (`max_score_tokens`) to keep them within a quarter of the memory kept free for the steps. With an
        `adapter`, it runs over a private copy of the LoRA factors with the adapter in slot 0 (the base weights are
        shared): the engine's slots are left alone, and this may run on another thread beside the steps."""
        L = len(token_ids)
        if L > self.max_score_tokens:
            raise ValueError(f"prompt logprobs are computed for prompts of up to {self.max_score_tokens} tokens "
                             f"(max_num_batched_tokens and the memory kept free for the steps); this one has {L}")
        padded = np.zeros((1, pow2_bucket(L, 16)), np.int32)
        padded[0, :L] = token_ids
        k = max(1, self.config.max_logprobs)  # one executable per bucket, whatever each request asks for
        weights, slots = list(self.weights), None
        if self.lora_leaves:
            slots = np.full(padded.shape[1], -1 if adapter is None else 0, np.int32)
            if adapter is not None:
                write_adapter(weights, self.lora_leaves, 0, adapter)
        lp, top_ids, top_lp, rank = self._score(self.graphdef, self.weights_tree, k,
                                                jax.device_put(padded, self.device), slots, *weights)
        lp, top_ids, top_lp = np.asarray(lp), np.asarray(top_ids)[:, :num_top], np.asarray(top_lp)[:, :num_top]
        rank = np.asarray(rank)
        return [None] + [prompt_logprob_entry(t, lp[i], top_ids[i], top_lp[i], rank[i])
                         for i, t in enumerate(token_ids[1:])]

    @property
    def max_score_tokens(self) -> int:
        """The longest prompt `score` takes: max_num_batched_tokens, or fewer where [L, vocab] f32 logits would
        take more than a quarter of `step_headroom` (a step may be in flight meanwhile)."""
        return min(self.config.max_num_batched_tokens, self.step_headroom() // (16 * self.model_config.vocab_size))

    # ------------------------------------------------------------------------------------------------------------
    def assign_slot(self, request: Request) -> None:
        """Seat a newly running request: its slot's row of the host-side per-slot state (sampling parameters,
        page table) and, if it uses penalties, its penalty-state rows on the device."""
        slot = self.free_slots.pop()
        self.slot_of[request.request_id] = slot
        p, s = request.sampling_params, self.slot_state
        V = self.model_config.vocab_size
        s.temperature[slot] = 0.0 if p.greedy else p.temperature
        s.top_k[slot] = p.top_k if 0 < p.top_k < V else 0
        s.top_p[slot], s.min_p[slot] = p.top_p, p.min_p
        s.repetition_penalty[slot] = p.repetition_penalty
        s.presence_penalty[slot], s.frequency_penalty[slot] = p.presence_penalty, p.frequency_penalty
        s.seeds[slot], s.min_tokens[slot] = request.seed % 2**32, p.min_tokens
        banned = ((() if p.ignore_eos else request.eos_token_ids) + tuple(p.stop_token_ids))[:NUM_BANNED]
        s.eos_ids[slot] = -1
        s.eos_ids[slot, :len(banned)] = banned
        s.num_pages[slot] = 0
        s.lora_slot[slot] = request.lora_slot
        if p.penalised:
            known = [t for t in request.output_token_ids if t >= 0]
            counts = np.bincount(np.asarray(known, np.int64), minlength=V).astype(np.int32)
            mask = np.zeros(V, bool)
            mask[request.prompt_token_ids] = True
            self.counts = self._set_row(self.counts, slot, counts)
            self.tables.set_prompt_mask(slot, mask)
        self.tables.seat(slot, request)  # logit bias and guide mask rows

    def load_adapter(self, slot: int, adapter: AdapterWeights) -> None:
        """Write an adapter into a LoRA slot (the scheduler gave it the slot; steps from now on read it)."""
        write_adapter(self.weights, self.lora_leaves, slot, adapter)

    def release_slot(self, request: Request) -> None:
        slot = self.slot_of.pop(request.request_id, None)
        if slot is not None:
            self.slot_state.page_table[slot, :self.slot_state.num_pages[slot]] = 0
            self.slot_state.num_pages[slot] = 0
            self.free_slots.append(slot)

    def prepare(self, out: SchedulerOutput) -> tuple[StepInputs, list[bool]]:
        """Flatten a scheduled step into padded fixed-shape host arrays.

        Only what changes per step is gathered request by request, in one Python loop (slot, computed tokens,
        token count, the step's tokens and any new pages); everything else is numpy over the rows, from the
        per-slot state `assign_slot` filled (at 1,000 decode rows the per-row Python was the larger part)."""
        T, R = self.bucket(out.num_tokens)
        inp = self._empty_inputs(T, R)
        s, slot_of = self.slot_state, self.slot_of
        table, num_pages = s.page_table, s.num_pages
        slots, starts, lens, totals, steps, tokens = [], [], [], [], [], []
        for req, n in out.scheduled:
            slot = slot_of.get(req.request_id)
            if slot is None:
                self.assign_slot(req)
                slot = slot_of[req.request_id]
            elif req.guide is not None:  # its grammar state moved with its last token
                self.tables.update_guide(slot, req)
            pages = req.page_ids
            have = num_pages[slot]
            if len(pages) != have:  # pages only grow while a request holds its slot
                assert len(pages) > have, "a seated request lost pages"
                table[slot, have:len(pages)] = pages[have:]
                num_pages[slot] = len(pages)
            start, outputs = req.num_computed_tokens, req.output_token_ids
            total = len(req.prompt_token_ids) + len(outputs)
            if n == 1 and start + 1 == total:  # a decode row: its newest token (-1 while still on the device)
                tokens.append(outputs[-1] if outputs else req.prompt_token_ids[-1])
            else:
                chunk = req.token_ids_slice(start, start + n)
                assert chunk[-1] >= 0, "only a decode token can be pending"
                tokens += chunk
            slots.append(slot)
            starts.append(start)
            lens.append(n)
            totals.append(total)
            steps.append(len(outputs))
        r = len(slots)
        slots, starts, lens = (np.array(x, np.int32) for x in (slots, starts, lens))
        ends = np.cumsum(lens, dtype=np.int32)
        num = int(ends[-1]) if r else 0
        if num == r:  # one token a row
            row_slots, positions = slots, starts
        else:
            row_of = np.repeat(np.arange(r), lens)
            row_slots = slots[row_of]
            positions = starts[row_of] + np.arange(num, dtype=np.int32) - (ends - lens)[row_of]
        P = self.config.page_size
        token_ids = np.array(tokens, np.int32)
        inp.input_ids[:num] = token_ids
        inp.from_slot[:num] = np.where(token_ids < 0, row_slots, -1)
        inp.positions[:num] = positions
        inp.slot_mapping[:num] = table[row_slots, positions // P] * P + positions % P
        if self.lora_leaves:
            inp.lora_slots[:num] = s.lora_slot[row_slots]
        inp.seq_lens[:r] = seq_lens = starts + lens
        inp.query_start_loc[1:r + 1] = ends
        inp.query_start_loc[r + 1:] = num
        inp.logits_indices[:r] = ends - 1
        inp.page_table[:r] = table[slots]
        inp.slots[:r] = slots
        sample_mask = seq_lens == np.array(totals, np.int32)
        inp.sample_mask[:r] = sample_mask
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "seeds"):
            getattr(inp, name)[:r] = getattr(s, name)[slots]
        inp.step[:r] = steps = np.array(steps, np.int32)
        suppress = steps < s.min_tokens[slots]
        for i in np.flatnonzero(suppress):  # a finished grammar outranks min_tokens: EOS is all that may follow
            req = out.scheduled[i][0]
            suppress[i] = req.guide is None or not req.guide.complete(req.guide_state)
        if suppress.any():
            inp.suppress_eos[:r] = suppress
            inp.eos_ids[:r] = np.where(suppress[:, None], s.eos_ids[slots], -1)
        return inp.replace(num_seqs=np.int32(r)), sample_mask.tolist()

    def run(self, inp: StepInputs, variant: str = "full", decode_only: bool = False):
        """Dispatch one step (asynchronously); returns the device-side sample output. `variant` (step_variant):
        the cheapest sampler the step's rows allow; where that executable does not exist (yet), the next one in
        FALLBACK serves the step, with the same tokens. decode_only (every request has one token): the first
        variant of that chain with a decode twin runs, else the chain as it is."""
        T, R = inp.input_ids.shape[0], inp.seq_lens.shape[0]
        if (T, R, "full") not in self.executables:
            self.warmup(progress=False)  # only when warm-up was skipped: compile everything once, now
        chain = CHAIN[variant]
        twins = [v + DECODE for v in chain if decode_only and (T, R, v + DECODE) in self.executables]
        variant = self.last_variant = (twins or [v for v in chain if (T, R, v) in self.executables])[0]
        res = self._call(self.executables[(T, R, variant)], inp)
        res.token_ids.copy_to_host_async()  # queued behind the step: the read-back finds it on the host
        return res
