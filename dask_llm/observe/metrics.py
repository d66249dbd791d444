"""Live metrics on a cluster: ``dask_llm_*`` series on dask's own Prometheus endpoint.

``distributed`` serves ``/metrics`` on every worker's and the scheduler's
HTTP server with ``prometheus_client.generate_latest()``, which renders the
process-wide ``prometheus_client.REGISTRY`` (``distributed/http/worker/
prometheus/core.py`` registers dask's own collector there the same way). So
a collector registered in that registry is scraped with dask's metrics, by
the Prometheus (and the Grafana) that already watches the cluster: no port,
no exporter, no configuration of ours.

``install()`` registers one collector per process, the first time a job
starts there (``engine.job``); it reads, at scrape time, the counters that the
run record (``observe.record.process_totals()``) keeps for every job that ran in the process.
On the scheduler, the dask-llm plugin (``cluster.plugin``) sums the
record deltas every worker sends through the event log, and the same
collector renders them with ``scope="cluster"``; a worker's own series have
``scope="process"``. Counters count since the process started, over all its
jobs (Prometheus' ``rate()`` and ``increase()`` expect exactly that), so no
series is created per job and the cardinality stays fixed.

=================================  =======  ==================================================
name                               type     what
=================================  =======  ==================================================
``dask_llm_requests_total``        counter  requests sent to the provider
``dask_llm_responses_total``       counter  answers (or failures) that came back
``dask_llm_rate_limited_total``    counter  429 answers (quota and others)
``dask_llm_errors_total``          counter  failed requests, label ``kind`` ("429 rate limit",
                                            "429 other", "500", "timeout", "connection", ...)
``dask_llm_retries_total``         counter  chain-call attempts after the first
``dask_llm_input_tokens_total``    counter  prompt tokens of answers
``dask_llm_output_tokens_total``   counter  completion tokens of answers
``dask_llm_spend_usd_total``       counter  US dollars of answers at the job's prices
``dask_llm_rows_total``            counter  rows finished, label ``status`` (ok, failed)
``dask_llm_requests_in_flight``    gauge    requests on the wire now (scope="process" only)
=================================  =======  ==================================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from dask_llm.core.runtime import part
from dask_llm.observe.record import ProcessTotals, process_totals


class ClusterTotals(ProcessTotals):
    """Cluster totals on the scheduler, summed from the workers' record deltas."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        super().__init__()
        self.seen = False  # a worker has reported: the "cluster" scope is shown


class Metrics:
    """The collector this process registered in ``prometheus_client.REGISTRY`` (a part of
    the process's ``core.runtime``); ``close()`` unregisters it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.collector: _Collector | None = None

    def close(self) -> None:
        with self.lock:
            collector, self.collector = self.collector, None
        if collector is not None:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(collector)


def install() -> bool:
    """Register the collector in ``prometheus_client.REGISTRY`` once; False if unavailable."""
    metrics = part(Metrics)
    with metrics.lock:
        if metrics.collector is not None:
            return True
        try:
            from prometheus_client import REGISTRY
        except ImportError:  # pragma: no cover - a dependency, but metrics are optional
            return False
        metrics.collector = _Collector()
        REGISTRY.register(metrics.collector)
        return True


def add_cluster_delta(delta: Mapping[str, Any]) -> None:
    """Add one worker's record delta to the cluster totals (on the scheduler)."""
    c = part(ClusterTotals)
    with c.lock:
        c.seen = True
        for row in delta.get("seconds", ()):
            _t, started, finished, _fl, limited, other, retries, _err, tin, tout, cost = row
            c.requests += int(started)
            c.responses += int(finished)
            c.rate_limited += int(limited + other)
            c.retries += int(retries)
            c.input_tokens += int(tin)
            c.output_tokens += int(tout)
            c.spend_usd += float(cost)
        for _t, kind, n in delta.get("errors", ()):
            c.errors[kind] = c.errors.get(kind, 0) + int(n)
        rows = delta.get("rows") or {}
        c.rows += int(rows.get("n", 0))
        c.rows_failed += int(rows.get("failed", 0))


class _Collector:
    """Renders the process totals (and, on a scheduler that heard from workers, the cluster's)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        scopes: list[tuple[str, ProcessTotals]] = [("process", process_totals())]
        cluster = part(ClusterTotals)
        if cluster.seen:
            scopes.append(("cluster", cluster))
        simple = (
            ("requests", "Requests dask-llm sent to the provider", "requests"),
            ("responses", "Answers (or failures) that came back", "responses"),
            ("rate_limited", "429 answers (the quota's and others)", "rate_limited"),
            ("retries", "Chain-call attempts after the first", "retries"),
            ("input_tokens", "Prompt tokens of answers", "input_tokens"),
            ("output_tokens", "Completion tokens of answers", "output_tokens"),
            ("spend_usd", "US dollars of answers, at the job's prices", "spend_usd"),
        )
        families = {
            name: CounterMetricFamily(f"dask_llm_{name}", text, labels=["scope"])
            for name, text, _ in simple
        }
        errors = CounterMetricFamily(
            "dask_llm_errors", "Failed requests, by kind", labels=["scope", "kind"]
        )
        rows = CounterMetricFamily("dask_llm_rows", "Rows finished", labels=["scope", "status"])
        in_flight = GaugeMetricFamily(
            "dask_llm_requests_in_flight", "Requests on the wire now", labels=["scope"]
        )
        for scope, totals in scopes:
            with totals.lock:
                for name, _, attr in simple:
                    families[name].add_metric([scope], getattr(totals, attr))
                for kind, n in sorted(totals.errors.items()):
                    errors.add_metric([scope, kind], n)
                rows.add_metric([scope, "ok"], totals.rows - totals.rows_failed)
                rows.add_metric([scope, "failed"], totals.rows_failed)
                if scope == "process":
                    in_flight.add_metric([scope], totals.in_flight)
        yield from families.values()
        yield errors
        yield rows
        yield in_flight

    def describe(self) -> list[Any]:
        return []  # no describe-time registration check (names are fixed, values dynamic)
