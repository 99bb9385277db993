"""The worker registry as the API and /metrics show it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.tables import Job, JobStatus, Worker
from app.jobs import state


@dataclass
class WorkerView:
    id: str
    host: str
    pid: int
    state: str
    slots: int
    devices: list[str]
    weights: list[str]
    jobs: list[str]
    started_at: datetime
    heartbeat_at: datetime
    seconds_since_heartbeat: float
    stopped_at: datetime | None


def registry(session: Session) -> list[WorkerView]:
    now = session.scalar(select(state.db_now()))
    assert now is not None
    jobs: dict[str, list[str]] = {}
    for job_id, worker in session.execute(
        select(Job.id, Job.worker).where(Job.status == JobStatus.RUNNING).order_by(Job.started_at)
    ):
        jobs.setdefault(worker or "", []).append(job_id)
    views = []
    for w in session.scalars(select(Worker)):
        if w.stopped_at is not None:
            status = "stopped"
        elif _aware(w.lease_expires_at) < _aware(now):
            status = "lost"
        else:
            status = "draining" if w.draining else "running"
        views.append(
            WorkerView(
                id=w.id,
                host=w.host,
                pid=w.pid,
                state=status,
                slots=w.slots,
                devices=[str(d) for d in w.devices],
                weights=[str(a) for a in w.weights],
                jobs=jobs.get(w.id, []),
                started_at=w.started_at,
                heartbeat_at=w.heartbeat_at,
                seconds_since_heartbeat=max(0.0, (_aware(now) - _aware(w.heartbeat_at)).total_seconds()),
                stopped_at=w.stopped_at,
            )
        )
    order = {"running": 0, "draining": 1, "lost": 2, "stopped": 3}
    return sorted(views, key=lambda v: (order[v.state], v.host, v.started_at))


def _aware(t: datetime) -> datetime:
    """SQLite gives naive datetimes back (we store UTC)."""
    from datetime import UTC

    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
