"""Job state transitions, each one a single conditional UPDATE.

A job is held by one *attempt* at a time: claiming bumps ``attempt``, and every later write from a worker
or job process is fenced on (id, attempt, status='running'). A stale process (its job recovered and
claimed again elsewhere) finds its writes refused and stops.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.tables import Job, utcnow


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(session: Session, job_id: str, worker: str) -> int | None:
    """queued -> running; returns the new attempt number, or None if the job is not queued."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            attempt=Job.attempt + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=now,
            finished_at=None,
            error=None,
            error_code=None,
            message="starting",
            updated_at=now,
        )
        .returning(Job.attempt)
    ).first()
    return int(row[0]) if row else None


def fenced_update(session: Session, job_id: str, attempt: int, **values: Any) -> bool:
    """Update a running job only if ``attempt`` still holds it."""
    values.setdefault("updated_at", utcnow())
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == "running").values(**values)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def finish(
    session: Session,
    job_id: str,
    attempt: int,
    status: str,
    *,
    error: str | None = None,
    error_code: str | None = None,
    **values: Any,
) -> bool:
    now = utcnow()
    return fenced_update(
        session,
        job_id,
        attempt,
        status=status,
        error=error,
        error_code=error_code,
        finished_at=now,
        eta_seconds=None,
        **values,
    )


def cancel_requested(session: Session, job_id: str, attempt: int) -> bool:
    """True when the job was cancelled or is no longer held by this attempt (either way: stop)."""
    row = session.execute(select(Job.cancel_requested, Job.attempt, Job.status).where(Job.id == job_id)).first()
    return row is None or bool(row[0]) or row[1] != attempt or row[2] != "running"


def is_stale(job: Job, now: datetime, stale_after: float) -> bool:
    beat = job.heartbeat_at or job.started_at or job.created_at
    if beat.tzinfo is None:  # SQLite returns naive datetimes; we store UTC
        from datetime import UTC

        beat = beat.replace(tzinfo=UTC)
    return (now - beat).total_seconds() > stale_after
