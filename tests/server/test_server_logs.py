"""The server's logs: the periodic engine stats line (engine/stats_log.py: rates over each interval from the
engine's counters, quiet while idle, run by the server's lifespan) and the request log (--enable-log-requests)."""
from __future__ import annotations

import logging
import re
import time

import pytest
from harness import MODEL, LiveServer, make_engine, tok

from engine.stats_log import StatsLog


class FakeEngine:
    def __init__(self):
        self.s = dict(num_running=0, num_waiting=0, kv_usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0,
                      prompt_tokens_total=0, generation_tokens_total=0)
        self.now = 100.0


def test_rates_over_each_interval_and_quiet_when_idle():
    e = FakeEngine()
    log = StatsLog(lambda: dict(e.s), interval=10.0, clock=lambda: e.now)
    assert log.lines() == []  # the baseline
    e.now += 10.0
    assert log.lines() == []  # idle from the start: nothing
    e.now += 4.0
    e.s.update(num_running=3, num_waiting=1, kv_usage=0.25, prefix_cache_queries=400, prefix_cache_hits=100,
               prompt_tokens_total=1000, generation_tokens_total=37)
    (line,) = log.lines()
    assert line == ("engine: Avg prompt throughput: 250.0 tokens/s, Avg generation throughput: 9.2 tokens/s, "
                    "Running: 3 reqs, Waiting: 1 reqs, GPU KV cache usage: 25.0%, Prefix cache hit rate: 25.0%")
    e.now += 5.0
    e.s.update(num_running=0, num_waiting=0, kv_usage=0.0, generation_tokens_total=87)
    (line,) = log.lines()  # the interval the work finished in
    assert "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 10.0 tokens/s" in line
    assert "Running: 0 reqs" in line and "Prefix cache hit rate: 0.0%" in line
    e.now += 10.0
    (line,) = log.lines()  # one all-idle line, then quiet
    assert "Avg generation throughput: 0.0 tokens/s, Running: 0 reqs, Waiting: 0 reqs" in line
    e.now += 10.0
    assert log.lines() == []
    e.s.update(spec_draft_tokens=40, spec_accepted_tokens=10, generation_tokens_total=100)
    e.now += 10.0
    stats, spec = log.lines()
    assert "Avg generation throughput: 1.3 tokens/s" in stats
    assert spec == "engine: SpecDecoding metrics: Draft acceptance rate: 25.0%, Accepted: 10 tokens, Drafted: 40 tokens"
    with pytest.raises(ValueError, match="interval"):
        StatsLog(lambda: {}, interval=0)


def test_server_logs_the_line_while_it_serves(caplog):
    caplog.set_level(logging.INFO, logger="ie_jax.stats")
    server = LiveServer(make_engine(), log_stats_interval=0.2)
    try:
        client = server.client()
        deadline = time.monotonic() + 10
        while not any(float(r) > 0 for r in re.findall(r"Avg generation throughput: ([0-9.]+)", caplog.text)):
            assert time.monotonic() < deadline, caplog.text  # requests until an interval has seen one
            client.completions.create(model=MODEL, prompt="stats please", max_tokens=8, temperature=0)
            time.sleep(0.25)
        assert all(r.name == "ie_jax.stats" and r.levelno == logging.INFO for r in caplog.records)
    finally:
        server.stop()
    count = len(caplog.records)
    time.sleep(0.5)
    assert len(caplog.records) == count  # the server's shutdown stopped it


def test_request_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="ie_jax.requests")
    quiet = LiveServer(make_engine())
    try:
        quiet.client().completions.create(model=MODEL, prompt="not logged", max_tokens=2)
    finally:
        quiet.stop()
    assert not [r for r in caplog.records if r.name == "ie_jax.requests"]  # off unless asked for
    server = LiveServer(make_engine(), log_requests=True, max_log_len=6)
    try:
        client = server.client()
        r = client.completions.create(model=MODEL, prompt=["first prompt here", "second one"], max_tokens=2, n=2,
                                      temperature=0)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "chat me"}], max_tokens=2)
    finally:
        server.stop()
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "ie_jax.requests"]
    assert len(lines) == 3  # one per prompt, not per choice
    ids = tok(server).encode("first prompt here")[:6]
    assert lines[0].startswith(f"Received request {r.id}: prompt: 'first ', params: SamplingParams(")
    assert f"prompt_token_ids: {ids}, lora_request: None" in lines[0] and "max_tokens=2" in lines[0]
    assert "prompt: 'second'" in lines[1] and lines[2].startswith("Received request chatcmpl-")
    chat = tok(server).apply_chat_template([{"role": "user", "content": "chat me"}], add_generation_prompt=True,
                                           tokenize=False)
    assert f"prompt: {chat[:6]!r}" in lines[2]  # a chat prompt: the rendered conversation
