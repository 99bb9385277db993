"""The job state machine: every status change of a job, each one a single conditional UPDATE (or INSERT).

::

    create ──► queued ──claim──► running ──succeed──► succeeded
                 ▲ │              │ │ └──fail─────► failed ────┐
                 │ └─cancel──┐    │ └──cancel─────► cancelled ─┤
                 │           ▼    │                            │
                 │        cancelled                            │
                 ├──requeue (drain, lost lease, killed) ◄──────┘ (a retry; capped)
                 └──resume ◄── failed | cancelled (the user)

Each function says whether its transition happened: it did only if the row was still in the state the
transition starts from, so two processes racing for one job (a cancel and a claim, two recoveries, a stale
worker and a fresh one) can never both win. Nobody else writes ``status``.

A running job is held by one *attempt*: claiming bumps ``attempt``, and every later write from a worker or
job process is fenced on (id, attempt, status running). The holder keeps a *lease* on the database's clock
(``now()`` in SQL, never a host's clock): once ``lease_expires_at`` has passed, the job may be taken back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, insert, literal, or_, select, update
from sqlalchemy.orm import Session

from app.db.clock import db_now
from app.db.tables import FINISHED_STATUSES, Job, JobStatus, User, Worker

Q, R = JobStatus.QUEUED, JobStatus.RUNNING


# -- leases, on the database's clock (``db_now``) ---------------------------------------------------------


def lease_expired() -> ColumnElement[bool]:
    """A running job whose holder's lease has lapsed (rows from before leases: no lease, use the heartbeat)."""
    return or_(
        Job.lease_expires_at < db_now(),
        and_(Job.lease_expires_at.is_(None), func.coalesce(Job.heartbeat_at, Job.created_at) < db_now(-60)),
    )


# -- creating ---------------------------------------------------------------------------------------------


def _lock_owner(session: Session, owner_id: str) -> None:
    """Serialise one user's submits: PostgreSQL locks the user's row until commit (SQLite ignores FOR UPDATE;
    there the conditional INSERT below takes the database's write lock before it counts)."""
    session.execute(select(User.id).where(User.id == owner_id).with_for_update())


def _queued_count(owner_id: str) -> Any:
    return (
        select(func.count())
        .select_from(Job)
        .where(Job.owner_id == owner_id, Job.status == Q)
        .correlate(None)
        .scalar_subquery()
    )


def create(session: Session, values: dict[str, Any], max_queued: int) -> bool:
    """Insert a queued job (``values`` holds its columns, ``id`` included) unless its owner already has
    ``max_queued`` queued jobs (0: no cap). One statement counts and inserts, so concurrent submits cannot
    both pass the cap."""
    owner_id = values["owner_id"]
    row = {**values, "status": Q, "enqueued_at": db_now()}
    columns = Job.__table__.c
    source = select(*[v if isinstance(v, db_now) else literal(v, columns[k].type) for k, v in row.items()])
    if max_queued > 0:
        _lock_owner(session, owner_id)
        source = source.where(_queued_count(owner_id) < max_queued)
    return session.execute(insert(Job).from_select(list(row), source).returning(Job.id)).first() is not None


# -- a worker takes a job ---------------------------------------------------------------------------------


def claim(session: Session, job_id: str, worker: str, lease_seconds: float = 12.0) -> int | None:
    """queued -> running under a lease; returns the new attempt number, or None if the job is not queued
    (cancelled, or a duplicate message for a job another worker took)."""
    now = db_now()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == Q)
        .values(
            status=R,
            attempt=Job.attempt + 1,
            worker=worker,
            heartbeat_at=now,
            lease_expires_at=db_now(lease_seconds),
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


def _held(job_id: str, attempt: int) -> tuple[ColumnElement[bool], ...]:
    return (Job.id == job_id, Job.attempt == attempt, Job.status == R)


def fenced_update(session: Session, job_id: str, attempt: int, **values: Any) -> bool:
    """Progress of a running job (message, epoch, ETA...), written only if ``attempt`` still holds it."""
    if "status" in values:
        raise ValueError("status changes go through the transitions of app.jobs.state")
    values.setdefault("updated_at", db_now())
    result = session.execute(update(Job).where(*_held(job_id, attempt)).values(**values))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Lease:
    held: bool  # False: this attempt lost the job (recovered and maybe claimed elsewhere): stop at once
    cancel_requested: bool


def renew(session: Session, job_id: str, attempt: int, lease_seconds: float) -> Lease:
    """The holder's heartbeat: extend the lease; says whether it still holds the job and whether a cancel
    was asked for."""
    row = session.execute(
        update(Job)
        .where(*_held(job_id, attempt))
        .values(heartbeat_at=db_now(), lease_expires_at=db_now(lease_seconds))
        .returning(Job.cancel_requested)
    ).first()
    return Lease(held=row is not None, cancel_requested=bool(row[0]) if row else False)


def should_stop(session: Session, job_id: str, attempt: int) -> bool:
    """True when the job was cancelled or is no longer held by this attempt (either way: stop)."""
    row = session.execute(select(Job.cancel_requested, Job.attempt, Job.status).where(Job.id == job_id)).first()
    return row is None or bool(row[0]) or row[1] != attempt or row[2] != R


# -- endings ----------------------------------------------------------------------------------------------


def _finish(session: Session, job_id: str, attempt: int, status: JobStatus, **values: Any) -> bool:
    now = db_now()
    result = session.execute(
        update(Job)
        .where(*_held(job_id, attempt))
        .values(status=status, finished_at=now, updated_at=now, eta_seconds=None, lease_expires_at=None, **values)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def succeed(session: Session, job_id: str, attempt: int, **values: Any) -> bool:
    return _finish(session, job_id, attempt, JobStatus.SUCCEEDED, error=None, error_code=None, **values)


def fail(session: Session, job_id: str, attempt: int, error: str, code: str, **values: Any) -> bool:
    values.setdefault("message", "failed")
    return _finish(session, job_id, attempt, JobStatus.FAILED, error=error, error_code=code, **values)


def cancelled(session: Session, job_id: str, attempt: int, message: str = "cancelled") -> bool:
    """running -> cancelled, recorded by the attempt that stopped (its process has finished writing)."""
    return _finish(session, job_id, attempt, JobStatus.CANCELLED, message=message)


# -- back to the queue ------------------------------------------------------------------------------------


class Requeued(enum.Enum):
    REQUEUED = "requeued"
    FAILED = "failed"  # a retry past the cap: failed with the reason
    CANCELLED = "cancelled"  # a cancel was asked for meanwhile: it wins
    LOST = "lost"  # the attempt no longer held the job: nothing done


def requeue(
    session: Session,
    job_id: str,
    attempt: int,
    reason: str,
    *,
    retry: bool,
    max_retries: int = 0,
    only_if_expired: bool = False,
) -> Requeued:
    """running -> queued again, to continue from its last checkpoint on any worker.

    ``retry``: an involuntary stop (the process was killed, its worker lost): counted, and past
    ``max_retries`` the job fails with ``reason`` instead. A drain is not a retry. ``only_if_expired``: the
    recovery's condition, so a holder that renewed its lease meanwhile keeps the job.
    """
    held = [*_held(job_id, attempt)]
    if only_if_expired:
        held.append(lease_expired())
    if session.execute(update(Job).where(*held, Job.cancel_requested.is_(True)).values(updated_at=db_now())).rowcount:  # type: ignore[attr-defined]
        cancelled(session, job_id, attempt)
        return Requeued.CANCELLED
    values: dict[str, Any] = {
        "status": Q,
        "worker": None,
        "lease_expires_at": None,
        "eta_seconds": None,
        "message": reason[:300],
        "enqueued_at": db_now(),
        "updated_at": db_now(),
    }
    conditions = list(held)
    if retry:
        values.update(retries=Job.retries + 1, retry_reason=reason)
        conditions.append(Job.retries < max_retries)
    if session.execute(update(Job).where(*conditions).values(**values)).rowcount:  # type: ignore[attr-defined]
        return Requeued.REQUEUED
    if retry:
        error = f"{reason} (no retry left: {max_retries} automatic retries were made)"
        failed = session.execute(
            update(Job)
            .where(*held)
            .values(
                status=JobStatus.FAILED,
                error=error[:2000],
                error_code="retries_exhausted",
                message="failed",
                finished_at=db_now(),
                lease_expires_at=None,
                eta_seconds=None,
                updated_at=db_now(),
            )
        ).rowcount  # type: ignore[attr-defined]
        if failed:
            return Requeued.FAILED
    return Requeued.LOST


def mark_enqueued(session: Session, job_id: str, older_than: float | None = None) -> bool:
    """Record that a message is being sent for a queued job. With ``older_than``: only if the last one went
    out more than that many seconds ago (so of several workers sweeping for lost messages, one sends it)."""
    conditions = [Job.id == job_id, Job.status == Q]
    if older_than is not None:
        conditions.append(or_(Job.enqueued_at.is_(None), Job.enqueued_at < db_now(-older_than)))
    result = session.execute(update(Job).where(*conditions).values(enqueued_at=db_now()))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def set_waiting_message(session: Session, job_id: str, message: str) -> bool:
    """Why a queued job waits (no worker holds its weights, say)."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == Q).values(message=message[:300]))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


# -- the user's requests ----------------------------------------------------------------------------------


class CancelOutcome(enum.Enum):
    CANCELLED = "cancelled"  # it was queued: cancelled at once
    REQUESTED = "requested"  # it is running: its process stops at the next batch and records it
    FINISHED = "finished"  # it had already ended: nothing to cancel


def request_cancel(session: Session, job_id: str) -> CancelOutcome:
    """Cancel a queued job at once, or ask a running one to stop. Never writes ``cancelled`` over a job a
    worker has claimed meanwhile: that one is asked to stop, and its process records the cancel."""
    for _ in range(3):  # a job may move between the two statements (claimed, or requeued): look again
        now = db_now()
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == Q)
            .values(status=JobStatus.CANCELLED, finished_at=now, updated_at=now, message="cancelled before it started")
        ).rowcount  # type: ignore[attr-defined]
        if done:
            return CancelOutcome.CANCELLED
        asked = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == R)
            .values(cancel_requested=True, message="cancelling...", updated_at=now)
        ).rowcount  # type: ignore[attr-defined]
        if asked:
            return CancelOutcome.REQUESTED
        if session.scalar(select(Job.status).where(Job.id == job_id)) in FINISHED_STATUSES:
            return CancelOutcome.FINISHED
    return CancelOutcome.FINISHED


def resume(session: Session, job_id: str, owner_id: str, message: str, max_queued: int) -> bool:
    """failed | cancelled -> queued, by the user; counts against the owner's queued cap like a new job.
    The retry budget starts afresh."""
    conditions = [Job.id == job_id, Job.status.in_((JobStatus.FAILED, JobStatus.CANCELLED))]
    if max_queued > 0:
        _lock_owner(session, owner_id)
        conditions.append(_queued_count(owner_id) < max_queued)
    now = db_now()
    result = session.execute(
        update(Job)
        .where(*conditions)
        .values(
            status=Q,
            cancel_requested=False,
            error=None,
            error_code=None,
            finished_at=None,
            eta_seconds=None,
            retries=0,
            message=message,
            enqueued_at=now,
            updated_at=now,
        )
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def delete_finished(session: Session, job_id: str) -> bool:
    """Delete a job that has ended (its metrics go with it; its model keeps its files and loses the link)."""
    result = session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(FINISHED_STATUSES)))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


# -- workers ----------------------------------------------------------------------------------------------


def worker_alive() -> ColumnElement[bool]:
    return and_(Worker.stopped_at.is_(None), Worker.lease_expires_at >= db_now())


def register_worker(session: Session, lease_seconds: float, **values: Any) -> None:
    now = db_now()
    session.execute(
        insert(Worker).values(started_at=now, heartbeat_at=now, lease_expires_at=db_now(lease_seconds), **values)
    )


def renew_worker(session: Session, worker_id: str, lease_seconds: float, **values: Any) -> bool:
    result = session.execute(
        update(Worker)
        .where(Worker.id == worker_id, Worker.stopped_at.is_(None))
        .values(heartbeat_at=db_now(), lease_expires_at=db_now(lease_seconds), **values)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def stop_worker(session: Session, worker_id: str) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=db_now(), draining=False))
