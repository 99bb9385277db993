"""Prometheus metrics: one ``CollectorRegistry`` per app (tests build many apps in one process), request
counts and latency by route template, and gauges read when ``/metrics`` is scraped.

Routes are labelled by their template (``/api/v1/models/{model_id}``), never by the raw path: ids in
paths would make one time series per model. Unmatched paths share one label for the same reason.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

UNMATCHED_ROUTE = "<unmatched>"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the service exports, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "finetune_http_requests", "HTTP requests handled", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "finetune_http_request_duration_seconds",
            "time to the end of the response, by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("finetune_queue_depth", "job messages waiting for a worker", registry=r)
        self.jobs_running = Gauge("finetune_jobs_running", "jobs with status running", registry=r)
        self.predict_batch_size = Histogram(
            "finetune_predict_batch_size",
            "images per forward pass of the prediction batcher",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.predict_images = Counter("finetune_predict_images", "images classified", registry=r)
        self.model_cache_size = Gauge("finetune_model_cache_size", "models loaded for prediction", registry=r)
        self.model_loads = Counter("finetune_model_loads", "models loaded into the prediction cache", registry=r)
        self.pixel_store = Gauge(
            "finetune_pixel_store_bytes",
            "this host's pixel store: used, pinned by running jobs, being built, and the budget (max)",
            ["kind"],
            registry=r,
        )
        self.pixel_store_shards = Gauge("finetune_pixel_store_shards", "shard files in the pixel store", registry=r)
        # The worker registry (every worker of the deployment, read from the database at each scrape).
        self.workers = Gauge("finetune_workers", "workers by state", ["state"], registry=r)
        worker_labels = ["worker", "host", "state"]
        self.worker_slots = Gauge("finetune_worker_slots", "jobs a worker runs at once", worker_labels, registry=r)
        self.worker_jobs = Gauge("finetune_worker_jobs", "jobs a worker runs now", worker_labels, registry=r)
        self.worker_heartbeat_age = Gauge(
            "finetune_worker_heartbeat_age_seconds",
            "seconds since a worker's last heartbeat, on the database's clock",
            worker_labels,
            registry=r,
        )

    def observe_batch(self, size: int) -> None:
        self.predict_batch_size.observe(size)
        self.predict_images.inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The template of the route that handled ``scope`` (after routing ran), with its router prefixes.

    FastAPI may leave the route as its router declared it (``/models/{model_id}``, without the prefix
    ``/api/v1``); path parameters never span a ``/``, so the prefix is the leading segments of the
    request path that the route's own segments do not cover.
    """
    route = scope.get("route")
    path_format = getattr(route, "path_format", None) or getattr(route, "path", None)
    if route is None or not isinstance(path_format, str):
        return UNMATCHED_ROUTE
    if isinstance(route, Mount):
        return path_format.removesuffix("/{path}") + "/{path}"
    path: str = scope.get("path", "")
    own = path_format.count("/")
    segments = path.split("/")
    if own == 0 or len(segments) - 1 < own:
        return path_format
    suffix = "/" + "/".join(segments[len(segments) - own :])
    regex = getattr(route, "path_regex", None)
    if regex is not None and not regex.match(suffix):
        return path_format  # a path convertor spans segments: the declared template is the best we have
    prefix = "/".join(segments[: len(segments) - own])
    return prefix + path_format


class MetricsMiddleware:
    """Counts every HTTP request and times it to the end of its response (streams included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees when the app raises before answering

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.observe(scope, status, time.perf_counter() - start)

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        try:
            method, route = scope.get("method", "?"), route_template(scope)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(seconds)
        except Exception:  # metrics must never break a request
            log.exception("could not record request metrics")


def scrape_values(app: Any) -> None:
    """Refresh the gauges that are read from elsewhere (blocking: the queue and the database)."""
    from sqlalchemy import func, select

    from app.db.tables import Job, JobStatus
    from app.services.workers import registry

    metrics: Metrics = app.state.metrics
    try:
        metrics.queue_depth.set(app.state.queue.depth())
    except Exception:
        log.exception("could not read the queue depth")
        metrics.queue_depth.set(float("nan"))
    try:
        with app.state.sessions() as session:
            running = session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.RUNNING))
        metrics.jobs_running.set(running or 0)
    except Exception:
        log.exception("could not count running jobs")
        metrics.jobs_running.set(float("nan"))
    try:
        with app.state.sessions() as session:
            set_worker_gauges(metrics, registry(session))
    except Exception:
        log.exception("could not read the worker registry")
    cache = getattr(app.state, "model_cache", None)
    if cache is not None:
        metrics.model_cache_size.set(len(cache))
    store = getattr(app.state, "pixel_store", None)
    if store is not None:
        try:
            usage = store.usage()
            for kind in ("used", "pinned", "building", "max"):
                metrics.pixel_store.labels(kind).set(usage[f"{kind}_bytes"])
            metrics.pixel_store_shards.set(usage["shards"])
        except Exception:
            log.exception("could not read the pixel store's usage")


def set_worker_gauges(metrics: Metrics, workers: list[Any]) -> None:
    """One series per worker still in the registry but stopped ones (the registry forgets them after a day)."""
    for gauge in (metrics.worker_slots, metrics.worker_jobs, metrics.worker_heartbeat_age):
        gauge.clear()
    counts = dict.fromkeys(("running", "draining", "lost", "stopped"), 0)
    for w in workers:
        counts[w.state] += 1
        if w.state == "stopped":
            continue
        labels = (w.id, w.host, w.state)
        metrics.worker_slots.labels(*labels).set(w.slots)
        metrics.worker_jobs.labels(*labels).set(len(w.jobs))
        metrics.worker_heartbeat_age.labels(*labels).set(w.seconds_since_heartbeat)
    for worker_state, count in counts.items():
        metrics.workers.labels(worker_state).set(count)
