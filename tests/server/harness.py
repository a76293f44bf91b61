"""The server tests' shared harness: the real engine on the tiny byte-level Llama, its greedy reference, uvicorn
on a free localhost port, and the helpers that read responses."""
from __future__ import annotations

import functools
import socket
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import uvicorn

import ie_jax
from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.server import build_app
from ie_jax.sampling import SamplingParams
from ie_jax.tokenizer import ByteTokenizer

MODEL = "test-model"
MAX_MODEL_LEN = 128


@functools.cache
def _tiny_model():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=1)


@functools.cache
def make_engine():
    """The real engine on the tiny byte-level Llama (one per test module: its buckets compile once)."""
    model, tokenizer = _tiny_model()
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_num_batched_tokens=128, page_size=16,
                          token_buckets=(8, 32, 128))
    return AsyncLLM(LLMEngine(model, tokenizer, config, progress=False))


def pooling_server() -> tuple[LiveServer, AsyncLLM]:
    """A server of its own over the tiny Llama with a 48-token context, for the embedding-based routes."""
    model, tok = _tiny_model()
    config = EngineConfig(max_model_len=48, max_num_seqs=4, max_num_batched_tokens=64, page_size=16)
    engine = AsyncLLM(LLMEngine(model, tok, config, progress=False))
    return LiveServer(engine), engine


def unit_embedding(model, ids: list[int]) -> np.ndarray:
    """The reference pooling: a dense forward's last hidden state, L2-normalized."""
    hidden = np.asarray(model(jnp.asarray([ids], jnp.int32), hidden=True)[0][0, -1], np.float64)
    return hidden / np.linalg.norm(hidden)


def greedy_reference(engine, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The ids a greedy request must get: the reference generate on the same model."""
    model, tokenizer = _tiny_model()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return ie_jax.generate(model, tokenizer, [list(prompt_ids)], params)[0].token_ids


class LiveServer:
    def __init__(self, engine, name: str | list[str] = MODEL, **kwargs):
        self.engine = engine
        self.app = build_app(engine, served_model_name=name, **kwargs)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             **kwargs)

    def stop(self):
        self._server.should_exit = True
        self._thread.join(timeout=10)


def tok(live) -> ByteTokenizer:
    return live.engine.tokenizer


def reference_text(live, prompt_ids, max_tokens) -> str:
    return tok(live).decode(greedy_reference(live.engine, prompt_ids, max_tokens))


def sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of a server-sent-event stream, [DONE] included."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def idle(engine) -> bool:
    stats = engine.stats()
    return stats["num_running"] == 0 and stats["num_waiting"] == 0


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str) and error["code"] == status
    for word in words:
        assert word in error["message"], error["message"]
    return error
