"""Builds the FastAPI application: settings, database, storage, queue, routes, pages."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from app.api.routes import datasets, jobs
from app.db import session_factory
from app.errors import install_error_handlers
from app.jobs.queue import JobQueue
from app.pages import routes as pages
from app.services.users import ensure_local_user
from app.settings import Settings, get_settings
from app.storage import Storage

log = logging.getLogger(__name__)
API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app.state.storage.clean_temp()
        with app.state.sessions.begin() as session:
            app.state.local_user_id = ensure_local_user(session).id
        yield
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
    install_error_handlers(app)

    api = APIRouter(prefix=API_PREFIX)
    api.include_router(datasets.router)
    api.include_router(jobs.router)
    app.include_router(api)
    pages.install(app)  # the HTML pages and /static (after the API: its routes come first)
    return app
