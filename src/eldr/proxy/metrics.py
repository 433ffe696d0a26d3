"""The proxy's Prometheus metrics, on an object with its own registry (no global state).

| name                                   | type      | labels                     |
|----------------------------------------|-----------|----------------------------|
| eldr_requests_total                    | counter   | endpoint, status           |
| eldr_request_duration_seconds          | histogram | endpoint, status           |
| eldr_leg_requests_total                | counter   | role, worker, outcome      |
| eldr_leg_duration_seconds              | histogram | role, worker, outcome      |
| eldr_retries_total                     | counter   | role                       |
| eldr_routing_decisions_total           | counter   | policy, worker             |
| eldr_routing_fallbacks_total           | counter   | reason                     |
| eldr_signature_sources_total           | counter   | source                     |
| eldr_malformed_signatures_total        | counter   | worker                     |
| eldr_band_size                         | histogram |                            |
| eldr_chosen_similarity                 | histogram |                            |
| eldr_routing_decision_seconds          | histogram |                            |
| eldr_in_flight                         | gauge     | role, worker               |
| eldr_worker_healthy                    | gauge     | role, worker               |
| eldr_admission_rejections_total        | counter   | reason                     |
| eldr_stream_errors_total               | counter   | reason                     |
| eldr_client_disconnects_total          | counter   |                            |
| eldr_refits_total                      | counter   |                            |
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DECISION_BUCKETS_S = (25e-6, 50e-6, 100e-6, 150e-6, 250e-6, 500e-6, 1e-3, 5e-3)


class Metrics:
    """Every `eldr_*` series the proxy exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "eldr_requests", "client requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "eldr_request_duration_seconds",
            "client request latency to the last byte",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.legs = Counter(
            "eldr_leg_requests",
            "upstream legs by engine and outcome",
            ["role", "worker", "outcome"],
            registry=r,
        )
        self.leg_seconds = Histogram(
            "eldr_leg_duration_seconds",
            "upstream leg latency to the last byte",
            ["role", "worker", "outcome"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.retries = Counter("eldr_retries", "failovers to another instance", ["role"], registry=r)
        self.decisions = Counter(
            "eldr_routing_decisions", "decode routing decisions", ["policy", "worker"], registry=r
        )
        self.fallbacks = Counter(
            "eldr_routing_fallbacks",
            "decisions made without a usable signature (JSQ)",
            ["reason"],
            registry=r,
        )
        self.signature_sources = Counter(
            "eldr_signature_sources", "where prefill signatures came from", ["source"], registry=r
        )
        self.malformed = Counter(
            "eldr_malformed_signatures", "unusable signatures sent by an engine", ["worker"], registry=r
        )
        self.band_size = Histogram(
            "eldr_band_size", "locality band size", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r
        )
        self.similarity = Histogram(
            "eldr_chosen_similarity",
            "cosine similarity to the chosen worker's centroid",
            buckets=tuple(i / 10 for i in range(1, 11)),
            registry=r,
        )
        self.decision_seconds = Histogram(
            "eldr_routing_decision_seconds",
            "signature decode + routing decision time",
            buckets=DECISION_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "eldr_in_flight", "requests in flight per engine", ["role", "worker"], registry=r
        )
        self.healthy = Gauge("eldr_worker_healthy", "1 when routable", ["role", "worker"], registry=r)
        self.rejections = Counter(
            "eldr_admission_rejections", "requests refused by admission control", ["reason"], registry=r
        )
        self.stream_errors = Counter(
            "eldr_stream_errors", "streams ended by an upstream failure mid-way", ["reason"], registry=r
        )
        self.disconnects = Counter("eldr_client_disconnects", "clients gone before the answer", registry=r)
        self.refits = Counter("eldr_refits", "online refits of the decode centroids", registry=r)

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: the per-request series are looked up once, not per call.

        Only for series that are never removed (`healthy` is, when an instance is drained)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
