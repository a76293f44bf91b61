"""LoRA adapters through the server, as a vLLM user starts it: `serve.py --enable-lora --lora-modules name=path`,
adapters chosen by the request's `model`, listed in /v1/models, loaded and unloaded at run time when allowed."""
from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn
from flax import nnx

import ie_jax
from engine.async_llm import AsyncLLM
from engine.server import build_app
from finetune.export import load_peft_adapter, save_peft_adapter
from finetune.lora import LoraConfig, apply_lora, merge_lora
from ie_jax.generate import prompt_logprobs
from ie_jax.sampling import SamplingParams

_spec = importlib.util.spec_from_file_location("serve", Path(__file__).resolve().parents[2] / "scripts" / "serve.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

PROMPT = "Once upon a time"


def _base():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=0)  # serve.py's default --seed


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    model, _ = _base()
    dirs = {}
    for name, cfg in (("all", LoraConfig(r=8, alpha=16, init_lora_weights=False, seed=7)),
                      ("qv", LoraConfig(r=4, alpha=4, target_modules=("q_proj", "v_proj"), init_lora_weights=False,
                                        seed=8))):
        m = nnx.clone(model)
        apply_lora(m, cfg)
        dirs[name] = save_peft_adapter(m, cfg, tmp_path_factory.mktemp(name))
    return dirs


def reference_text(adapter_dir, prompt: str, max_tokens: int) -> str:
    model, tok = _base()
    model = nnx.clone(model)
    load_peft_adapter(model, adapter_dir)
    merge_lora(model)
    ids = ie_jax.generate(model, tok, [prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                              ignore_eos=True))[0].token_ids
    return tok.decode(ids)


@pytest.fixture(scope="module")
def live(adapter_dirs):
    old = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    args = serve.parse_args(["--model", "tiny-llama", "--dtype", "float32", "--max-model-len", "64",
                             "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--page-size", "16",
                             "--compilation-cache-dir", "", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                             "--lora-modules", f"all={adapter_dirs['all']}",
                             f'{{"name": "qv", "path": "{adapter_dirs["qv"]}", "base_model_name": "tiny-llama"}}'])
    engine = AsyncLLM.from_args(args)
    app = build_app(engine, served_model_name=args.served_model_name, model_root=args.model)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    server.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()
    if old is None:
        os.environ.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    else:
        os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = old


def test_adapters_are_models(live, adapter_dirs):
    url, engine = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny-llama", "all", "qv"}
    assert cards["all"].parent == "tiny-llama" and cards["all"].root == str(adapter_dirs["all"])
    assert cards["tiny-llama"].parent is None
    for name in ("all", "qv"):
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert out.model == name
        assert out.choices[0].text == reference_text(adapter_dirs[name], PROMPT, 8)
    # streamed, with the base model in flight beside it
    chunks = client.completions.create(model="qv", prompt=PROMPT, max_tokens=8, temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    base = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0.0,
                                     extra_body={"ignore_eos": True})
    pieces = [(c.model, c.choices[0].text) for c in chunks if c.choices]
    assert {m for m, _ in pieces} == {"qv"}
    assert "".join(t for _, t in pieces) == reference_text(adapter_dirs["qv"], PROMPT, 8)
    assert base.choices[0].text != reference_text(adapter_dirs["qv"], PROMPT, 8)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    # echo + logprobs (lm-evaluation-harness's loglikelihood) under an adapter scores the prompt with it
    scored = client.completions.create(model="qv", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    base = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    lp, base_lp = scored.choices[0].logprobs.token_logprobs, base.choices[0].logprobs.token_logprobs
    assert lp[0] is None and len(lp) == len(base_lp) == len(PROMPT) + 1  # BOS + one byte a character
    assert max(abs(a - b) for a, b in zip(lp[1:], base_lp[1:])) > 1e-3
    model, tok = _base()
    merged = nnx.clone(model)
    load_peft_adapter(merged, adapter_dirs["qv"])
    merge_lora(merged)
    want = prompt_logprobs(merged, tok.encode(PROMPT), 1)
    ids = tok.encode(PROMPT)
    assert max(abs(x - w[t]) for x, w, t in zip(lp[1:], want[1:], ids[1:])) < 1e-4
    # embeddings come from the base model, even with adapter slots in the weights; naming an adapter is refused
    emb = client.embeddings.create(model="tiny-llama", input=PROMPT).data[0].embedding
    hidden = np.asarray(model(jnp.asarray([ids], jnp.int32), hidden=True)[0][0, -1], np.float64)
    np.testing.assert_allclose(emb, hidden / np.linalg.norm(hidden), atol=2e-5)
    with pytest.raises(openai.BadRequestError, match="does not apply"):
        client.embeddings.create(model="qv", input=PROMPT)
    bm = engine.engine.block_manager
    assert bm.num_free_pages == bm.num_pages
    metrics = httpx.get(f"{url}/metrics").text
    assert 'ie_jax:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in metrics
    assert engine.engine.stats()["lora"] == {"running": [], "waiting": [], "max_lora": 2}


def test_load_and_unload_at_run_time(live, adapter_dirs, tmp_path):
    url, _ = live
    http = httpx.Client(base_url=url, timeout=60)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "qv2", "lora_path": str(adapter_dirs["qv"])})
    assert r.status_code == 200 and "qv2" in r.text
    assert "qv2" in {m["id"] for m in http.get("/v1/models").json()["data"]}
    r = http.post("/v1/completions", json={"model": "qv2", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                           "ignore_eos": True})
    assert r.json()["choices"][0]["text"] == reference_text(adapter_dirs["qv"], PROMPT, 6)
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "qv2", "lora_path": str(adapter_dirs["qv"])})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    missing = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)})
    assert missing.status_code == 400 and "adapter_config.json" in missing.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "qv2"}).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "qv2"}).status_code == 404
    r = http.post("/v1/completions", json={"model": "qv2", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 404


def test_serve_flags():
    with pytest.raises(SystemExit):
        serve.parse_args(["--lora-modules", "a=/x"])  # without --enable-lora
    with pytest.raises(SystemExit):
        serve.parse_args(["--enable-lora", "--lora-modules", "just-a-name"])
    args = serve.parse_args(["--enable-lora", "--lora-modules", "a=/x", '{"name": "b", "path": "/y"}'])
    assert [(m.lora_name, m.lora_path) for m in args.lora_modules] == [("a", "/x"), ("b", "/y")]
    assert (args.max_loras, args.max_lora_rank) == (1, 16) and args.served_model_name == ["default"]
    assert serve.parse_args(["--served-model-name", "a", "b"]).served_model_name == ["a", "b"]
