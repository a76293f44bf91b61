"""Serving LoRA adapters: the engine with adapters == the reference generate on each adapter merged into the base,
token for token, with adapters and the base model mixed in one step, fewer slots than adapters, and prefix caching
kept apart per adapter."""
import dataclasses
import json
from pathlib import Path

import numpy as np

import pytest
from flax import nnx
from safetensors.numpy import load_file

import ie_jax
from engine.llm import LLM
from engine.lora import AdapterSlots, LoRARequest
from finetune.export import load_peft_adapter, save_peft_adapter
from finetune.lora import LoraConfig, apply_lora, merge_lora
from ie_jax import SamplingParams
from ie_jax.generate import prompt_logprobs

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SYSTEM = "You are a helpful assistant. Answer briefly. "  # shared prefix: prefix-cache pages across requests


@pytest.fixture(scope="module")
def tiny():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=1)


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    """Two PEFT adapters with random (non-zero) factors: all linear layers at r=8, and q/v only at r=4 (rsLoRA)."""
    model, _ = tiny
    out = {}
    for name, cfg in (("all", LoraConfig(r=8, alpha=16, target_modules="all-linear", init_lora_weights=False,
                                         seed=3)),
                      ("qv", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), use_rslora=True,
                                        init_lora_weights=False, seed=4))):
        m = nnx.clone(model)
        apply_lora(m, cfg)
        path = tmp_path_factory.mktemp(name)
        save_peft_adapter(m, cfg, path)
        out[name] = LoRARequest(name, len(out) + 1, str(path))
    return out


def merged_reference(tiny, lora: LoRARequest | None, prompts, params=GREEDY):
    model, tok = tiny
    if lora is not None:
        model = nnx.clone(model)
        load_peft_adapter(model, lora.lora_path)
        merge_lora(model)
    return [o.token_ids for o in ie_jax.generate(model, tok, prompts, params)]


def make_llm(tiny, **kw):
    model, tok = tiny
    args = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, page_size=8, progress=False,
                enable_lora=True, max_loras=2, max_lora_rank=8)
    return LLM(model, tokenizer=tok, **{**args, **kw})


PROMPTS = [SYSTEM + "Hello there", SYSTEM + "What is 2+2?", "The quick brown fox", SYSTEM + "Hello there"]


@pytest.mark.parametrize("max_loras", [2, 1])
def test_adapters_and_base_in_one_batch_match_merged_references(tiny, adapters, max_loras):
    """Every prompt under the base model and under each adapter, all submitted together. With max_loras=1 the two
    adapters cannot share a step, so requests wait for the slot; outputs must not change."""
    llm = make_llm(tiny, max_loras=max_loras)
    choices = [None, adapters["all"], adapters["qv"]]
    prompts = [p for _ in choices for p in PROMPTS]
    loras = [c for c in choices for _ in PROMPTS]
    compiled = llm.engine.runner.num_compiled()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=loras, use_tqdm=False)]
    want = [t for c in choices for t in merged_reference(tiny, c, PROMPTS)]
    assert got == want
    base, with_all, with_qv = (want[i * len(PROMPTS):(i + 1) * len(PROMPTS)] for i in range(3))
    assert base != with_all and base != with_qv and with_all != with_qv  # the adapters do change the model
    engine = llm.engine
    assert engine.runner.num_compiled() == compiled  # adapters are weights: no new executables
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages
    assert engine.scheduler.adapter_slots.users == [0] * max_loras
    # the shared system prompt hit the prefix cache, but only within each adapter's requests
    assert engine.block_manager.prefix_hits > 0


def test_prefix_cache_is_kept_apart_per_adapter(tiny, adapters):
    """The same prompt under the base model, then under an adapter: the second must not reuse the first's pages."""
    llm = make_llm(tiny)
    prompt = SYSTEM + "Go on."
    base = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    hits = llm.engine.block_manager.prefix_hits
    adapted = llm.generate([prompt], GREEDY, lora_request=adapters["all"], use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.block_manager.prefix_hits == hits
    assert base == merged_reference(tiny, None, [prompt])[0]
    assert adapted == merged_reference(tiny, adapters["all"], [prompt])[0]
    again = llm.generate([prompt], GREEDY, lora_request=adapters["all"], use_tqdm=False)[0].outputs[0].token_ids
    assert again == adapted and llm.engine.block_manager.prefix_hits > hits  # same adapter: pages shared


def test_seeded_sampling_with_an_adapter_does_not_depend_on_the_batch(tiny, adapters):
    params = SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=8, ignore_eos=True)
    llm = make_llm(tiny)
    alone = llm.generate([PROMPTS[1]], params, lora_request=adapters["qv"], use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(PROMPTS, params, lora_request=[None, adapters["qv"], adapters["all"], None],
                         use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone


def test_adapter_errors_are_clear(tiny, adapters, tmp_path):
    model, tok = tiny
    plain = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, page_size=8,
                progress=False)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate(["hi"], GREEDY, lora_request=adapters["all"], use_tqdm=False)
    small = make_llm(tiny, max_lora_rank=4)
    with pytest.raises(ValueError, match="LoRA rank 8 is greater than max_lora_rank 4"):
        small.generate(["hi"], GREEDY, lora_request=adapters["all"], use_tqdm=False)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        small.generate(["hi"], GREEDY, lora_request=LoRARequest("nothing", 9, str(tmp_path)), use_tqdm=False)
    assert small.engine.add_lora(adapters["qv"]) and not small.engine.add_lora(adapters["qv"])
    with pytest.raises(ValueError, match="already loaded"):
        small.engine.add_lora(dataclasses.replace(adapters["qv"], lora_path=str(tmp_path)))
    # an adapter of the output head is refused (serving adapts the decoder layers)
    m = nnx.clone(model)
    cfg = LoraConfig(r=4, target_modules=("lm_head", "q_proj"), init_lora_weights=False)
    apply_lora(m, cfg)
    save_peft_adapter(m, cfg, tmp_path / "head")
    with pytest.raises(ValueError, match="lm_head"):
        small.engine.add_lora(LoRARequest("head", 5, str(tmp_path / "head")))
    assert small.engine.block_manager.num_free_pages == small.engine.block_manager.num_pages


def test_prompt_logprobs_under_an_adapter_match_the_merged_model(tiny, adapters):
    """Prompt logprobs are scored under the request's adapter (over a private copy of the slot factors), while
    other adapters hold the engine's slots."""
    model, tok = tiny
    llm = make_llm(tiny, max_loras=1)
    params = dataclasses.replace(GREEDY, max_tokens=3, prompt_logprobs=2)
    llm.generate(["warm"], GREEDY, lora_request=adapters["all"], use_tqdm=False)  # "all" holds the one slot
    got = llm.generate([PROMPTS[1]], params, lora_request=adapters["qv"], use_tqdm=False)[0]
    merged = nnx.clone(model)
    load_peft_adapter(merged, adapters["qv"].lora_path)
    merge_lora(merged)
    ids = tok.encode(PROMPTS[1])
    want = prompt_logprobs(merged, ids, 2)
    base = prompt_logprobs(model, ids, 2)
    assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(want)
    for g, w, b in zip(got.prompt_logprobs[1:], want[1:], base[1:]):
        assert g.keys() == w.keys()
        np.testing.assert_allclose([g[t] for t in w], [w[t] for t in w], atol=1e-4)
    assert not all(np.allclose([w[t] for t in w], [b.get(t, 0) for t in w], atol=1e-3) for w, b in
                   zip(want[1:], base[1:]))  # the adapter does move them
    assert llm.engine.scheduler.adapter_slots.holder == ["qv"]  # the request itself then took the slot
    assert llm.engine.score_prompt(PROMPTS[1], 2, adapters["qv"])[1] == got.prompt_logprobs[1]
    assert llm.engine.score_prompt(PROMPTS[1], 2)[1].keys() == base[1].keys()


def test_remove_lora_frees_its_slot(tiny, adapters):
    llm = make_llm(tiny, max_loras=1)
    engine = llm.engine
    llm.generate(["abc"], GREEDY, lora_request=adapters["qv"], use_tqdm=False)
    assert [a.lora_name for a in engine.list_loras()] == ["qv"]
    assert engine.scheduler.adapter_slots.holder == ["qv"]
    engine.add_request("x", "abc", GREEDY, lora_request=adapters["qv"])
    assert engine.stats()["lora"] == {"running": [], "waiting": ["qv"], "max_lora": 1}
    engine.step()
    assert engine.stats()["lora"]["running"] == ["qv"]
    with pytest.raises(ValueError, match="in use"):
        engine.remove_lora("qv")
    engine.abort_request("x")
    assert engine.remove_lora("qv") and not engine.remove_lora("qv")
    assert engine.scheduler.adapter_slots.holder == [None]
    got = llm.generate(["abc"], GREEDY, lora_request=adapters["all"], use_tqdm=False)[0].outputs[0].token_ids
    assert got == merged_reference(tiny, adapters["all"], ["abc"])[0]


def test_adapter_slots_reuse_then_evict_least_recently_used():
    slots = AdapterSlots(2)
    assert slots.acquire("a") == 0 and slots.acquire("b") == 1 and slots.acquire("a") == 0
    assert slots.acquire("c") is None  # both slots in use
    assert slots.take_loads() == [(0, "a"), (1, "b")] and slots.take_loads() == []
    slots.release(1)  # b idle
    slots.release(0)
    slots.release(0)  # a idle, used after b
    assert slots.acquire("a") == 0 and slots.take_loads() == []  # still resident: no load
    assert slots.acquire("c") == 1 and slots.take_loads() == [(1, "c")]  # b was the only idle slot
    slots.release(0)
    slots.release(1)
    assert slots.acquire("d") == 0  # a went idle before c
    with pytest.raises(AssertionError):
        for _ in range(2):
            slots.release(1)


def test_unroll_off_and_gpt2_layouts(tmp_path):
    """The stacked-weights step (unroll_layers=False) and GPT-2's natively fused c_attn take adapters too."""
    model, tok = ie_jax.load_model("tiny-gpt2", dtype="float32", seed=2)
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", init_lora_weights=False, seed=5)
    m = nnx.clone(model)
    apply_lora(m, cfg)
    save_peft_adapter(m, cfg, tmp_path)
    lora = LoRARequest("g", 1, str(tmp_path))
    prompts = ["Hello there", "abc"]
    want = merged_reference((model, tok), lora, prompts)
    for unroll in (True, False):
        llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, page_size=8,
                  progress=False, enable_lora=True, max_lora_rank=4, unroll_layers=unroll)
        got = llm.generate(prompts, GREEDY, lora_request=lora, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == want


def test_adapter_over_a_quantized_base(adapters):
    """An adapter trained on the float model, served over its int8 quantization (a QLoRA-style deployment): the
    engine == the reference generate with the adapter wrapped around the quantized layers."""
    model, tok = ie_jax.load_model("tiny-llama", dtype="float32", seed=1, quantization="int8")
    ref = nnx.clone(model)
    load_peft_adapter(ref, adapters["all"].lora_path)
    want = [o.token_ids for o in ie_jax.generate(ref, tok, PROMPTS[:2], GREEDY)]
    llm = LLM(model, tokenizer=tok, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, page_size=8,
              progress=False, enable_lora=True, max_lora_rank=8)
    got = llm.generate(PROMPTS[:2], GREEDY, lora_request=adapters["all"], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert want != merged_reference((model, tok), None, PROMPTS[:2])


PEFT_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("case", sorted(p.name for p in (PEFT_FIXTURES / "peft").iterdir()))
def test_served_adapter_matches_hf_peft_logits(case):
    """Adapters written by HF PEFT itself (tests/fixtures/peft, with the logits HF computed): the serving engine's
    prompt logprobs under the adapter are the log-softmax of PEFT's logits. Covers GPT-2's Conv1D layout, Llama-3
    q/v with rsLoRA inside the fused qkv slots, and Qwen3 (q/k norms) with regex targets."""
    adapter = PEFT_FIXTURES / "peft" / case
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = PEFT_FIXTURES / "hf" / config["base_model_name_or_path"].rsplit("/", 1)[-1]
    golden = load_file(str(adapter / "golden.safetensors"))
    model, tok = ie_jax.load_model(base, dtype="float32", progress=False)
    ids = [int(t) for t in golden["input_ids"][0]]
    llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32, page_size=8,
              progress=False, enable_lora=True, max_lora_rank=max(16, int(config["r"])))
    got = llm.engine.score_prompt(ids, 0, LoRARequest(case, 1, str(adapter)))
    logits = golden["logits"][0].astype(np.float64)
    want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    np.testing.assert_allclose([got[i][t] for i, t in enumerate(ids) if i], [want[i - 1, t] for i, t in
                                                                            enumerate(ids) if i], atol=2e-4)
    base_lp = llm.engine.score_prompt(ids, 0)
    assert max(abs(base_lp[i][t] - got[i][t]) for i, t in enumerate(ids) if i) > 1e-3  # the adapter matters
