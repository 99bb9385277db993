"""The API stays responsive under load: requests give their database connection back before they await,
and forward passes run below the event loop's CPU priority (training runs lower still: nice 10, checked by the
fault-injection tests). ``python -m bench.load`` measures the whole of it."""

from __future__ import annotations

import os
import threading

from starlette.requests import Request

from app.api.deps import get_current_user
from app.db import engine_for
from app.main import create_app
from app.serving.cache import FORWARD_NICE, ModelCache
from app.settings import Settings
from tests.app.conftest import Account


def test_authentication_gives_the_database_connection_back(settings: Settings, admin: Account) -> None:
    """With more requests in flight than pooled connections, a request that held its connection from
    authentication until its handler finished awaiting (a body, a forward pass) starved the others: under 64
    concurrent predicts, requests failed after the pool's 30 s timeout (78 of 349 in ``bench.load``)."""
    app = create_app(settings)
    headers = [(b"authorization", f"Bearer {admin.key}".encode())]
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""})
    session = app.state.sessions()
    try:
        user = get_current_user(request, session)
        assert not session.in_transaction()
        assert engine_for(settings.db_url).pool.checkedout() == 0  # type: ignore[attr-defined]
        assert (user.id, user.name, user.is_admin) == (admin.user_id, "admin", True)  # still usable
    finally:
        session.close()


def test_forward_passes_run_below_the_event_loop_priority() -> None:
    cache = ModelCache(1, max_batch=4, max_wait_ms=1)
    executor = cache._forward_executor()
    try:
        here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        there = executor.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    finally:
        executor.shutdown()
    assert there == min(19, here + FORWARD_NICE)
