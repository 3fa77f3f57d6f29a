"""Prometheus metrics of the search proxy (one registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class SearchMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "argus_search_requests_total", "Requests by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.cache = Counter("argus_search_cache_total", "Cache lookups", ["kind", "result"], registry=r)
        self.upstream_calls = Counter(
            "argus_search_upstream_calls_total", "Calls to the search backend", ["backend"], registry=r
        )
        self.upstream_errors = Counter(
            "argus_search_upstream_errors_total", "Failed backend calls", ["backend", "status"], registry=r
        )
        self.coalesced = Counter(
            "argus_search_coalesced_total", "Requests served by another request's call", registry=r
        )
        self.latency = Histogram(
            "argus_search_request_seconds", "Request latency at the proxy", ["endpoint"], buckets=_LATENCY, registry=r
        )
        self.upstream_latency = Histogram(
            "argus_search_upstream_seconds", "Backend call latency", ["backend"], buckets=_LATENCY, registry=r
        )
        self.budget_used = Gauge("argus_search_budget_used", "Upstream calls used per run id", ["run_id"], registry=r)
        self.rejected = Counter("argus_search_rejected_total", "Requests refused", ["reason"], registry=r)
