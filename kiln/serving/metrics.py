"""Prometheus metrics of one serving process, in a registry of its own (so one process can run several servers).

Counters and histograms are updated by the serving core and the transports as requests flow; the engine
gauges (queue, running, KV blocks, prefix hit rate, padding waste, compiles) are read from `AsyncEngine.stats()`
at scrape time by a custom collector, so they are never stale and cost nothing between scrapes.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    """Gauges computed from the engine's counters on every scrape."""

    def __init__(self, stats: Callable[[], dict | None], pending: Callable[[], int]):
        self._stats, self._pending = stats, pending

    def collect(self):
        st = self._stats() or {}
        pad, real = float(st.get("padding_tokens", 0)), float(st.get("real_tokens", 0))
        gauges = [
            ("kiln_queue_length", "Requests waiting to be scheduled", st.get("waiting", 0)),
            ("kiln_running_requests", "Sequences being prefilled or decoded", st.get("running", 0)),
            ("kiln_pending_requests", "Requests accepted and not finished", self._pending()),
            ("kiln_kv_blocks_used", "KV-cache blocks referenced by requests", st.get("blocks_used", 0)),
            ("kiln_kv_blocks_free", "KV-cache blocks allocatable (cached ones included)", st.get("blocks_free", 0)),
            ("kiln_kv_blocks_cached", "Free KV-cache blocks holding a reusable prefix", st.get("blocks_cached", 0)),
            ("kiln_kv_cache_usage", "Fraction of KV-cache blocks in use", st.get("usage", 0)),
            ("kiln_prefix_cache_hit_rate", "Prompt blocks served by the prefix cache / blocks looked up",
             st.get("prefix_hit_rate", 0)),
            ("kiln_bucket_padding_ratio", "Padding tokens / (padding + real tokens) over all steps",
             pad / (pad + real) if pad + real else 0.0),
            ("kiln_compiles", "Graphs compiled since start", st.get("compiles", 0)),
            ("kiln_graph_cache_hits", "Graphs loaded from the persistent graph cache", st.get("graph_cache_hits", 0)),
            ("kiln_preemptions", "Requests preempted since start", st.get("preemptions", 0)),
            ("kiln_spec_draft_tokens", "Speculative draft tokens verified since start", st.get("spec_draft_tokens", 0)),
            ("kiln_spec_accepted_tokens", "Speculative draft tokens accepted since start",
             st.get("spec_accepted_tokens", 0)),
            ("kiln_spec_acceptance_rate", "Accepted / verified speculative draft tokens",
             st.get("spec_accepted_tokens", 0) / st["spec_draft_tokens"] if st.get("spec_draft_tokens") else 0.0),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g


class ServerMetrics:
    """The metrics of one server. `start_http(port)` serves them at http://host:port/metrics."""

    def __init__(self, stats: Callable[[], dict | None] = lambda: None, pending: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kiln_requests", "Finished requests by method (gRPC method or HTTP path) and status "
                                "(gRPC status name or HTTP status code)",
                                ["method", "status"], registry=r)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Request received to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kiln_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Request received to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated", registry=r)
        r.register(_EngineCollector(stats, pending))
        self.http_server = None

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0 = a free port); returns the port."""
        self.http_server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self.http_server.server_port

    def stop_http(self) -> None:
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
            self.http_server = None


class RequestObserver:
    """Feeds one request's cumulative outputs into a server's latency and token metrics.

    Call it with every RequestOutput as it arrives, and `finish()` once the request ended normally.
    """

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.t0 = self.last = time.perf_counter()
        self.n_tokens = 0

    def __call__(self, out) -> None:
        m, now = self.metrics, time.perf_counter()
        if self.n_tokens == 0 and any(c.token_ids for c in out.outputs):
            m.ttft.observe(now - self.t0)
        elif self.n_tokens:
            m.itl.observe(now - self.last)
        self.last = now
        total = sum(len(c.token_ids) for c in out.outputs)
        if self.n_tokens == 0:
            m.prompt_tokens.inc(len(out.prompt_token_ids))
        m.generation_tokens.inc(total - self.n_tokens)
        self.n_tokens = total

    def finish(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.t0)
