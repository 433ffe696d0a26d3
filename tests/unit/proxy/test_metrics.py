"""The proxy's lock-free metrics, as a Prometheus scrape sees them."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eldr.proxy.metrics import Metrics


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_gauges_and_histograms_are_exported() -> None:
    m = Metrics()
    m.retries.labels("prefill").inc()
    m.retries.labels("prefill").inc(2)
    m.disconnects.inc()
    m.in_flight.labels("decode", "http://d0").inc()
    m.in_flight.labels("decode", "http://d0").inc()
    m.in_flight.labels("decode", "http://d0").dec()
    m.healthy.labels("decode", "http://d1").set(1.0)
    for seconds in (0.0005, 0.001, 0.003, 200.0):  # <= first bucket, == first bound, third, past the last
        m.request_seconds.labels("/v1/completions", "200").observe(seconds)
    got = scrape(m)
    assert got["eldr_retries_total", (("role", "prefill"),)] == 3
    assert got["eldr_client_disconnects_total", ()] == 1
    assert got["eldr_in_flight", (("role", "decode"), ("worker", "http://d0"))] == 1
    assert got["eldr_worker_healthy", (("role", "decode"), ("worker", "http://d1"))] == 1
    labels = (("endpoint", "/v1/completions"), ("status", "200"))
    bucket = {
        le: got["eldr_request_duration_seconds_bucket", tuple(sorted((*labels, ("le", le))))]
        for le in ("0.001", "0.0025", "0.005", "120.0", "+Inf")
    }
    assert bucket == {"0.001": 2, "0.0025": 2, "0.005": 3, "120.0": 3, "+Inf": 4}  # cumulative, le inclusive
    assert got["eldr_request_duration_seconds_count", labels] == 4
    assert got["eldr_request_duration_seconds_sum", labels] == pytest.approx(200.0045)
    # the registry answers the same values (what the integration tests read)
    assert m.registry.get_sample_value("eldr_retries_total", {"role": "prefill"}) == 3


def test_removed_series_are_gone_and_label_counts_are_checked() -> None:
    m = Metrics()
    m.healthy.labels("decode", "http://d0").set(1.0)
    m.healthy.remove("decode", "http://d0")
    assert not any(name == "eldr_worker_healthy" for name, _ in scrape(m))
    with pytest.raises(ValueError, match="takes labels"):
        m.retries.labels("prefill", "extra")
