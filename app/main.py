"""Builds the FastAPI application: settings, database, storage, queue, routes, pages."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from app.api.routes import datasets, health, jobs, models, predict, weights
from app.db import session_factory
from app.errors import install_error_handlers
from app.jobs.queue import JobQueue
from app.observability import Metrics, MetricsMiddleware
from app.pages import routes as pages
from app.security import check_dependencies
from app.services.keycache import PredictLookups
from app.services.ratelimit import RateLimits
from app.serving.cache import ModelCache
from app.settings import Settings, get_settings
from app.storage import Storage

log = logging.getLogger(__name__)
API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None) -> FastAPI:
    check_dependencies()  # refuses versions with known vulnerabilities in the upload/decode/load paths
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app.state.storage.clean_temp()
        yield
        await app.state.model_cache.close()
        app.state.queue.close()

    app = FastAPI(
        title="finetune-service",
        summary="Fine-tune AlexNet, GoogLeNet and ResNets on your labeled images and serve predictions.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessions = session_factory(settings.db_url)
    app.state.storage = Storage(settings.data_dir)
    app.state.queue = JobQueue(settings)
    app.state.rate_limits = RateLimits.from_settings(settings)
    app.state.predict_lookups = PredictLookups()
    app.state.metrics = metrics = Metrics()
    app.state.model_cache = ModelCache(
        settings.model_cache_size,
        max_batch=settings.predict_max_batch,
        max_wait_ms=settings.predict_max_wait_ms,
        max_pixels=settings.max_image_pixels,
        on_batch=metrics.observe_batch,
        on_load=metrics.model_loads.inc,
        runtime=settings.predict_runtime,
        try_compile=settings.predict_compile,
        threads=settings.predict_threads,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)

    api = APIRouter(prefix=API_PREFIX)
    api.include_router(datasets.router)
    api.include_router(jobs.router)
    api.include_router(models.router)
    api.include_router(predict.router)
    api.include_router(weights.router)
    app.include_router(api)
    app.include_router(health.router)
    pages.install(app)  # the HTML pages and /static (after the API: its routes come first)
    return app
