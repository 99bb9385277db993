"""Builds the FastAPI application: settings, database, storage, queue, routes, pages."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.concurrency import run_in_threadpool

from app.api.routes import datasets, health, jobs, models, predict, weights, workers
from app.db import session_factory
from app.errors import install_error_handlers
from app.jobs.queue import JobQueue
from app.observability import Metrics, MetricsMiddleware
from app.pages import routes as pages
from app.security import check_dependencies
from app.services.dataset_checks import DatasetChecks
from app.services.keycache import PredictLookups
from app.services.ratelimit import RateLimits
from app.serving.cache import ModelCache
from app.settings import Settings, get_settings
from app.storage import Storage
from finetune.datastore import open_store

log = logging.getLogger(__name__)
API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None) -> FastAPI:
    check_dependencies()  # refuses versions with known vulnerabilities in the upload/decode/load paths
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        storage: Storage = app.state.storage
        storage.clean_temp()  # leftovers of a crash (never another live API's uploads in flight)
        stop = threading.Event()
        storage.keep_temp_alive(stop)
        app.state.dataset_checks.sweep()  # uploads a previous run of the service was checking when it stopped
        yield
        await run_in_threadpool(app.state.dataset_checks.shutdown)  # the checks running finish first
        stop.set()
        await app.state.model_cache.close()
        app.state.queue.close()
        app.state.pixel_store.close()
        storage.clean_temp()

    app = FastAPI(
        title="finetune-service",
        summary="Fine-tune AlexNet, GoogLeNet and ResNets on your labeled images and serve predictions.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessions = session_factory(settings.db_url)
    app.state.storage = Storage.from_settings(settings)
    app.state.queue = JobQueue(settings)
    # This host's pixel store: uploads stage their decoded pixels in it; /readyz and /metrics report it.
    app.state.pixel_store = open_store(settings.cache_dir, max_bytes=settings.cache_max_bytes)
    app.state.dataset_checks = DatasetChecks(settings, app.state.sessions, app.state.storage, app.state.pixel_store)
    app.state.rate_limits = RateLimits.from_settings(settings)
    app.state.predict_lookups = PredictLookups()
    app.state.metrics = metrics = Metrics()
    app.state.model_cache = ModelCache(
        settings.model_cache_size,
        max_batch=settings.predict_max_batch,
        max_wait_ms=settings.predict_max_wait_ms,
        batch_ms=settings.predict_batch_ms,
        max_pixels=settings.max_image_pixels,
        on_batch=metrics.observe_batch,
        on_load=metrics.model_loads.inc,
        runtime=settings.predict_runtime,
        try_compile=settings.predict_compile,
        threads=settings.predict_threads,
        lanes=settings.predict_lanes,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)

    api = APIRouter(prefix=API_PREFIX)
    api.include_router(datasets.router)
    api.include_router(jobs.router)
    api.include_router(models.router)
    api.include_router(predict.router)
    api.include_router(weights.router)
    api.include_router(workers.router)
    app.include_router(api)
    app.include_router(health.router)
    pages.install(app)  # the HTML pages and /static (after the API: its routes come first)
    return app
