"""The endpoint's Prometheus metrics (``GET /metrics``), and the ASGI middleware that counts
requests by route and status and times them."""

from __future__ import annotations

import time
from typing import Any

from pipeline.serving.slot import ServedModel


def multiprocess_dir() -> str | None:
    """Where the server's worker processes keep their metrics (prometheus_client's multiprocess
    mode, ``PROMETHEUS_MULTIPROC_DIR``, set by ``pipeline serve --workers`` before it starts
    them); None for a single process."""
    import os

    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process). With
    several worker processes, each writes its values to :func:`multiprocess_dir` and
    :meth:`exposition` adds up every worker's."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serve_requests", "HTTP requests by route and status code", ["route", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "serve_request_seconds",
            "Request latency by route",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.batch = Histogram(
            "serve_batch_images",
            "Images per forward pass (micro-batching)",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.version = Gauge(
            "serve_model_version",
            "The model version being served (1 on its labels)",
            ["model_name", "version", "alias"],
            registry=self.registry,
            multiprocess_mode="livemax",  # 1 while a live worker serves that version
        )
        self.reloads = Counter(
            "serve_model_reloads", "Alias moves followed (swapped) or not (failed)", ["result"], registry=self.registry
        )

    def served(self, served: ServedModel) -> None:
        meta = served.metadata
        labels = (meta["model_name"], meta["version"], meta["alias"] or "")
        self.version.labels(*labels).set(1)  # the new one first: a scrape always sees a version
        for old in [key for key in self.version._metrics if key != labels]:
            self.version.labels(*old).set(0)  # a worker's file keeps a removed series' last value
            self.version.remove(*old)

    def exposition(self) -> bytes:
        """The text ``GET /metrics`` answers: this process's metrics, or every worker's."""
        from prometheus_client import CollectorRegistry, generate_latest

        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)


ROUTES = {"/health", "/ready", "/metadata", "/metrics", "/predict"}


class CountRequests:
    """ASGI middleware: requests by route and status, and their latency (a plain ASGI wrapper:
    Starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
