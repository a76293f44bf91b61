"""The server's periodic engine stats line, as vLLM logs it every 10 s (off with --disable-log-stats):

    engine: Avg prompt throughput: 812.3 tokens/s, Avg generation throughput: 95.1 tokens/s, Running: 4 reqs,
    Waiting: 0 reqs, GPU KV cache usage: 3.1%, Prefix cache hit rate: 41.0%

Rates are over the interval since the previous line, from the engine's counters (`LLMEngine.stats`). An idle
engine logs one line after its last activity, then stays quiet until work arrives. With speculative decoding a
second line gives the interval's drafted and accepted tokens.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

logger = logging.getLogger("ie_jax.stats")


def log_to_stderr() -> None:
    """Show ie_jax's INFO lines on stderr, as vLLM's do (`INFO 12-05 21:00:00 message`); the server calls it."""
    log = logging.getLogger("ie_jax")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class StatsLog:
    def __init__(self, stats: Callable[[], dict], interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if interval <= 0:
            raise ValueError(f"{interval=} must be > 0 seconds")
        self.stats, self.interval, self.clock = stats, interval, clock
        self.last: tuple[float, dict] | None = None
        self.was_active = False

    def lines(self) -> list[str]:
        """The lines for the interval that ends now (none for the first call, or while idle)."""
        now, s = self.clock(), self.stats()
        if self.last is None:
            self.last = (now, s)
            return []
        t0, s0 = self.last
        self.last = (now, s)
        dt = max(now - t0, 1e-9)

        def delta(key: str) -> int:
            return s.get(key, 0) - s0.get(key, 0)

        prompt, generated = delta("prompt_tokens_total") / dt, delta("generation_tokens_total") / dt
        active = bool(prompt or generated or s["num_running"] or s["num_waiting"])
        if not (active or self.was_active):
            return []
        self.was_active = active
        queries = delta("prefix_cache_queries")
        hit_rate = delta("prefix_cache_hits") / queries if queries > 0 else 0.0
        out = [f"engine: Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation throughput: {generated:.1f} "
               f"tokens/s, Running: {s['num_running']} reqs, Waiting: {s['num_waiting']} reqs, GPU KV cache usage: "
               f"{100 * s['kv_usage']:.1f}%, Prefix cache hit rate: {100 * hit_rate:.1f}%"]
        if "spec_draft_tokens" in s:
            drafted, accepted = delta("spec_draft_tokens"), delta("spec_accepted_tokens")
            rate = f"{100 * accepted / drafted:.1f}%" if drafted else "n/a"
            out.append(f"engine: SpecDecoding metrics: Draft acceptance rate: {rate}, Accepted: {accepted} tokens, "
                       f"Drafted: {drafted} tokens")
        return out

    async def run(self) -> None:
        """Log the lines (logger "ie_jax.stats", INFO) every `interval` seconds until cancelled."""
        self.lines()  # the baseline
        while True:
            await asyncio.sleep(self.interval)
            for line in self.lines():
                logger.info(line)
