"""Prometheus metrics: request latency and counts (ASGI middleware), job and queue gauges."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.status import JOB_STATUSES

log = logging.getLogger(__name__)

STATUSES = tuple(str(s) for s in JOB_STATUSES)
UNMATCHED = "<unmatched>"


class ServiceCollector(Collector):
    """Collects, at scrape time, jobs by status from the store and the broker's queue depth."""

    def __init__(self, count_by_status: Callable[[], dict[str, int]], depth: Callable[[], Any]):
        self._count_by_status = count_by_status
        self._depth = depth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauges; a source that fails is skipped, never breaking the scrape."""
        jobs = GaugeMetricFamily("normcore_jobs", "Jobs by status", labels=["status"])
        try:
            counts = self._count_by_status()
        except Exception:
            log.exception("count_by_status failed during a metrics scrape")
        else:
            for state in sorted(set(STATUSES) | set(counts)):
                jobs.add_metric([state], float(counts.get(state, 0)))
            yield jobs
        try:
            depth = self._depth()
        except Exception:
            log.exception("queue_depth failed during a metrics scrape")
            depth = None
        if depth is not None:
            yield GaugeMetricFamily(
                "normcore_queue_depth", "Messages waiting in the broker", value=float(depth)
            )


class Metrics:
    """One registry per app, so several apps in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "normcore_http_request_duration_seconds",
            "HTTP request latency by route template and method",
            ["route", "method"],
            registry=self.registry,
        )
        self.requests = Counter(
            "normcore_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )

    def add_collector(self, collector: Collector) -> None:
        """Register a scrape-time collector."""
        self.registry.register(collector)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything registered."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Times every HTTP request and labels it by route template (not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Labelled children by label values: ``labels()`` takes a lock and checks its arguments
        # on every call, a measurable share of a fast request.
        self._latency: dict[tuple[str, str], Any] = {}
        self._requests: dict[tuple[str, str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request through, recording latency and the status code."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope.get("method", "GET")
            elapsed = time.perf_counter() - start
            key = (template, method)
            latency = self._latency.get(key)
            if latency is None:
                latency = self._latency[key] = self.metrics.latency.labels(template, method)
            latency.observe(elapsed)
            counted = (template, method, str(code))
            counter = self._requests.get(counted)
            if counter is None:
                counter = self._requests[counted] = self.metrics.requests.labels(*counted)
            counter.inc()
