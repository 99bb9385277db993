"""Probes and metrics at the root: ``/healthz`` (the process answers), ``/readyz`` (the database, the
queue and the pixel store answer; the store's usage and budget are in the answer), ``/metrics``
(Prometheus)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.api.deps import AdminUser
from app.errors import ApiError
from app.observability import scrape_values

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers (no I/O)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(request: Request) -> bool:
    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:
        log.exception("readiness: the database is not reachable")
        return False


@router.get(
    "/readyz",
    summary="Readiness: the database and the job queue answer",
    responses={503: {"description": "a check failed; `details` says which"}},
)
async def readyz(request: Request) -> dict[str, Any]:
    checks = {
        "database": "ok" if await run_in_threadpool(_check_database, request) else "failed",
        "queue": "ok" if await run_in_threadpool(request.app.state.queue.ping) else "failed",
    }
    store = await run_in_threadpool(_pixel_store_usage, request)
    checks["pixel_store"] = "ok" if store is not None else "failed"
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        raise ApiError(503, "not_ready", f"not ready: {', '.join(failed)} check failed", details=checks)
    return {"status": "ready", "checks": checks, "pixel_store": store}


def _pixel_store_usage(request: Request) -> dict[str, int] | None:
    """Bytes used, pinned and building in this host's pixel store, and its budget (``max_bytes``)."""
    try:
        usage: dict[str, int] = request.app.state.pixel_store.usage()
        return usage
    except Exception:
        log.exception("readiness: the pixel store is not readable")
        return None


@router.get(
    "/metrics",
    summary="Prometheus metrics (an admin's API key: give it to the scraper as a bearer token)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(request: Request, _admin: AdminUser) -> Response:
    await run_in_threadpool(scrape_values, request.app)
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
