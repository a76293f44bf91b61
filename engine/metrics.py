"""Prometheus metrics of one server: engine state read at scrape time, and per-request latencies.

Gauges and token counters come from `AsyncLLM.stats()` when /metrics is scraped, so the engine thread never
touches prometheus objects. Latency histograms (TTFT, inter-token latency, end-to-end) are observed by the server
as outputs reach it, which is what a client sees minus the network. Every `ServerMetrics` owns its registry, so
tests can build many apps in one process. Names carry the `ie_jax:` prefix the way vLLM's carry `vllm:`.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class _EngineStatsCollector(Collector):
    """Turns one `stats()` dict into gauges and counters at each scrape."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self._stats, self._labels = stats, {"model_name": model_name}

    def collect(self):
        s = self._stats()
        names = list(self._labels)
        values = list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        queries, hits = s.get("prefix_cache_queries", 0), s.get("prefix_cache_hits", 0)
        yield gauge("ie_jax:num_requests_running", "Requests in the running batch.", s.get("num_running", 0))
        yield gauge("ie_jax:num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0))
        yield gauge("ie_jax:kv_cache_usage_perc", "Fraction of KV-cache pages in use (0-1).", s.get("kv_usage", 0.0))
        yield gauge("ie_jax:prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens, since start.",
                    hits / queries if queries else 0.0)
        yield counter("ie_jax:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries)
        yield counter("ie_jax:prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield counter("ie_jax:prompt_tokens", "Prompt tokens processed.", s.get("prompt_tokens_total", 0))
        yield counter("ie_jax:generation_tokens", "Tokens generated.", s.get("generation_tokens_total", 0))
        if "spec_draft_tokens" in s:  # --speculative-config: drafts checked and kept, as vLLM's spec_decode counters
            yield counter("ie_jax:spec_decode_num_draft_tokens", "Draft tokens checked.", s["spec_draft_tokens"])
            yield counter("ie_jax:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                          s["spec_accepted_tokens"])
        lora = s.get("lora")
        if lora is not None:  # as vLLM's: the adapters in use as labels, the scrape time as the value
            g = GaugeMetricFamily("ie_jax:lora_requests_info", "LoRA adapters of the running and waiting requests.",
                                  labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
            g.add_metric([",".join(lora["running"]), ",".join(lora["waiting"]), str(lora["max_lora"])], time.time())
            yield g


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(stats, model_name))
        labels = ["model_name"]
        self.ttft = Histogram("ie_jax:time_to_first_token_seconds", "Arrival to first token.", labels,
                               buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("ie_jax:inter_token_latency_seconds", "Time between two outputs of a request.", labels,
                              buckets=_ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("ie_jax:e2e_request_latency_seconds", "Arrival to last token.", labels,
                              buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.finished = Counter("ie_jax:request_success", "Finished requests by finish reason.",
                                 ["model_name", "finished_reason"], registry=self.registry)
        self.model_name = model_name

    def tracker(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies of one engine request, fed by each output as it arrives."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics
        self.arrival = self._last = time.monotonic()
        self.first_token: float | None = None

    def on_output(self, num_new_tokens: int, finished: bool, finish_reason: str | None) -> None:
        now = time.monotonic()
        if num_new_tokens:
            if self.first_token is None:
                self.first_token = now
                self._m.ttft.observe(now - self.arrival)
            else:
                self._m.itl.observe(now - self._last)
            self._last = now
        if finished:
            self._m.e2e.observe(now - self.arrival)
            self._m.finished.labels(self._m.model_name, finish_reason or "abort").inc()
