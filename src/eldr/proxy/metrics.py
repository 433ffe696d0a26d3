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
| eldr_client_protocol_errors_total      | counter   | reason                     |
| eldr_client_connections                | gauge     |                            |
| eldr_body_bytes_in_flight              | gauge     |                            |
| eldr_requests_inside                   | gauge     |                            |
| eldr_requests_queued                   | gauge     |                            |

The values are plain Python numbers updated on the event loop, the only writer (a scrape runs there
too), and exported through a prometheus-client collector at scrape time: an update is a dict lookup
and an addition, where prometheus-client's own metric objects take a lock per update (~3 µs per
histogram observation, ~17 updates per request: ~10% of the proxy's CPU before this).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DECISION_BUCKETS_S = (25e-6, 50e-6, 100e-6, 150e-6, 250e-6, 500e-6, 1e-3, 5e-3)


class Value:
    """A counter's or gauge's value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Observations:
    """A histogram's bucket counts (non-cumulative; the last one is +Inf) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # bucket i: amount <= bounds[i]
        self.sum += amount


class Family:
    """One metric name and its series, one per tuple of label values."""

    def __init__(
        self,
        kind: str,
        name: str,
        doc: str,
        labelnames: tuple[str, ...] = (),
        buckets: tuple[float, ...] = (),
    ) -> None:
        self.kind, self.name, self.doc, self.labelnames, self.buckets = kind, name, doc, labelnames, buckets
        self.series: dict[tuple[str, ...], Any] = {}
        self._single: Any = self.labels() if not labelnames else None

    def labels(self, *values: str) -> Any:
        found = self.series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            found = self.series[values] = Observations(self.buckets) if self.kind == "histogram" else Value()
        return found

    def remove(self, *values: str) -> None:
        self.series.pop(values, None)

    # an unlabelled family is its own series
    def inc(self, amount: float = 1.0) -> None:
        self._single.inc(amount)

    def set(self, value: float) -> None:
        self._single.set(value)

    def observe(self, amount: float) -> None:
        self._single.observe(amount)

    def collect(self) -> Metric:
        names = list(self.labelnames)
        if self.kind == "counter":
            family: Any = CounterMetricFamily(self.name, self.doc, labels=names)
            for values, v in self.series.items():
                family.add_metric(list(values), v.value)
        elif self.kind == "gauge":
            family = GaugeMetricFamily(self.name, self.doc, labels=names)
            for values, v in self.series.items():
                family.add_metric(list(values), v.value)
        else:
            family = HistogramMetricFamily(self.name, self.doc, labels=names)
            for values, h in self.series.items():
                cumulative, buckets = 0, []
                for bound, count in zip((*self.buckets, float("inf")), h.counts, strict=True):
                    cumulative += count
                    buckets.append((_le(bound), cumulative))
                family.add_metric(list(values), buckets, h.sum)
        return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
    """Every `eldr_*` series the proxy exports, on a registry of its own."""

    def __init__(self) -> None:
        self.requests = Family(
            "counter", "eldr_requests", "client requests by endpoint and status", ("endpoint", "status")
        )
        self.request_seconds = Family(
            "histogram",
            "eldr_request_duration_seconds",
            "client request latency to the last byte",
            ("endpoint", "status"),
            LATENCY_BUCKETS_S,
        )
        self.legs = Family(
            "counter",
            "eldr_leg_requests",
            "upstream legs by engine and outcome",
            ("role", "worker", "outcome"),
        )
        self.leg_seconds = Family(
            "histogram",
            "eldr_leg_duration_seconds",
            "upstream leg latency to the last byte",
            ("role", "worker", "outcome"),
            LATENCY_BUCKETS_S,
        )
        self.retries = Family("counter", "eldr_retries", "failovers to another instance", ("role",))
        self.decisions = Family(
            "counter", "eldr_routing_decisions", "decode routing decisions", ("policy", "worker")
        )
        self.fallbacks = Family(
            "counter",
            "eldr_routing_fallbacks",
            "decisions made without a usable signature (JSQ)",
            ("reason",),
        )
        self.signature_sources = Family(
            "counter", "eldr_signature_sources", "where prefill signatures came from", ("source",)
        )
        self.malformed = Family(
            "counter", "eldr_malformed_signatures", "unusable signatures sent by an engine", ("worker",)
        )
        self.band_size = Family(
            "histogram",
            "eldr_band_size",
            "locality band size",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
        )
        self.similarity = Family(
            "histogram",
            "eldr_chosen_similarity",
            "cosine similarity to the chosen worker's centroid",
            buckets=tuple(i / 10 for i in range(1, 11)),
        )
        self.decision_seconds = Family(
            "histogram",
            "eldr_routing_decision_seconds",
            "signature decode + routing decision time",
            buckets=DECISION_BUCKETS_S,
        )
        self.in_flight = Family(
            "gauge", "eldr_in_flight", "requests in flight per engine", ("role", "worker")
        )
        self.healthy = Family("gauge", "eldr_worker_healthy", "1 when routable", ("role", "worker"))
        self.rejections = Family(
            "counter", "eldr_admission_rejections", "requests refused by admission control", ("reason",)
        )
        self.stream_errors = Family(
            "counter", "eldr_stream_errors", "streams ended by an upstream failure mid-way", ("reason",)
        )
        self.disconnects = Family("counter", "eldr_client_disconnects", "clients gone before the answer")
        self.refits = Family("counter", "eldr_refits", "online refits of the decode centroids")
        self.client_errors = Family(
            "counter",
            "eldr_client_protocol_errors",
            "client connections answered or closed by the HTTP server's limits",
            ("reason",),
        )
        self.client_connections = Family("gauge", "eldr_client_connections", "open client connections")
        self.body_bytes_in_flight = Family(
            "gauge", "eldr_body_bytes_in_flight", "request body bytes held by the requests inside"
        )
        self.requests_inside = Family("gauge", "eldr_requests_inside", "requests holding an admission slot")
        self.requests_queued = Family("gauge", "eldr_requests_queued", "requests waiting for a slot")
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        for family in vars(self).values():
            if isinstance(family, Family):
                yield family.collect()

    def render(self) -> bytes:
        return generate_latest(self.registry)
