"""Prometheus metrics of the code-executor service (one registry per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the output and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class SandboxMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.executions = Counter(
            "argus_sandbox_executions_total",
            "Code executions by protocol and outcome",
            ["protocol", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "argus_sandbox_execution_seconds",
            "Wall time of one execution, queueing in its session included",
            ["protocol"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.sessions_live = Gauge("argus_sandbox_sessions_live", "Sessions holding a kernel", registry=self.registry)
        self.background_processes = Gauge(
            "argus_sandbox_background_processes",
            "Processes cells left running, over all sessions (as last seen: after a cell, or polled while idle)",
            registry=self.registry,
        )
        self.background_cpu = Gauge(
            "argus_sandbox_background_cpu_seconds",
            "CPU seconds those background processes have used so far, idle time included",
            registry=self.registry,
        )
        self.pool_warm = Gauge(
            "argus_sandbox_pool_warm", "Started, pre-imported kernels waiting to be claimed", registry=self.registry
        )
        self.session_starts = Counter(
            "argus_sandbox_session_starts_total",
            "Sessions started, from the warm pool or cold",
            ["kind"],
            registry=self.registry,
        )
        self.kills = Counter(
            "argus_sandbox_kills_total",
            "Kernels stopped other than by a client's request",
            ["reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "argus_sandbox_rejected_total",
            "Requests refused at capacity after the admission wait (429, or 504 on /run_code)",
            registry=self.registry,
        )
        self.admission_queue = Gauge(
            "argus_sandbox_admission_queue",
            "Calls waiting at capacity for a session slot or a one-shot sandbox",
            ["kind"],
            registry=self.registry,
        )
        self.admission_wait = Histogram(
            "argus_sandbox_admission_wait_seconds",
            "How long calls waited at capacity before they were admitted or refused",
            ["kind"],
            registry=self.registry,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
        )
