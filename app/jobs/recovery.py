"""Taking jobs back: never leave a job `running` with nobody running it, nor `queued` with no message.

Runs on every worker's housekeeping thread (every ``recovery_interval_seconds``), never in the queue behind
training. Both parts are conditional updates, so several workers sweeping at once act once per job:

- A running job whose holder's lease has lapsed (on the database's clock) goes back to the queue and
  continues from its last checkpoint on any worker, or from the start when it had none; each time counts as
  a retry, and past ``max_job_retries`` it fails with the reason. The lapsed holder, if it is alive after
  all (cut off from the database), kills its child on its own when it cannot renew the lease.
- A queued job whose last message went out more than ``lost_message_seconds`` ago and that has no message in
  the queue is sent another: the row is the truth, the message only a doorbell.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import or_, select

from app.db import session_scope
from app.db.tables import Job, JobStatus
from app.jobs import state
from app.settings import Settings
from app.storage import Storage

if TYPE_CHECKING:
    from app.jobs.queue import JobQueue

log = logging.getLogger(__name__)


def recover_lost_jobs(settings: Settings, queue: JobQueue) -> list[str]:
    """Requeue (or fail, past the retry cap) running jobs whose lease has lapsed; returns the requeued ids."""
    storage = Storage.from_settings(settings)
    requeued: list[str] = []
    with session_scope(settings.db_url) as s:
        lost = s.execute(
            select(Job.id, Job.attempt, Job.run_key).where(Job.status == JobStatus.RUNNING, state.lease_expired())
        ).all()
        for job in lost:
            start = (
                "it continues from its last checkpoint"
                if storage.exists(f"{job.run_key}/last")
                else "it starts again (it had no checkpoint yet)"
            )
            reason = (
                f"its worker stopped renewing its lease (the worker died, was killed or lost the database); {start}"
            )
            outcome = state.requeue(
                s, job.id, job.attempt, reason, retry=True, max_retries=settings.max_job_retries, only_if_expired=True
            )
            if outcome is state.Requeued.REQUEUED:
                requeued.append(job.id)
                log.warning("job %s attempt %d: its worker's lease lapsed; back in the queue", job.id, job.attempt)
            elif outcome is state.Requeued.FAILED:
                log.warning(
                    "job %s attempt %d: its worker's lease lapsed and no retry is left; failed", job.id, job.attempt
                )
    for job_id in requeued:
        _enqueue(queue, job_id)
    return requeued


def resend_lost_messages(settings: Settings, queue: JobQueue) -> list[str]:
    """Send a message for every queued job that has been waiting without one; returns their ids."""
    grace = settings.lost_message_seconds
    with session_scope(settings.db_url) as s:
        waiting = s.scalars(
            select(Job.id)
            .where(
                Job.status == JobStatus.QUEUED, or_(Job.enqueued_at.is_(None), Job.enqueued_at < state.db_now(-grace))
            )
            .order_by(Job.created_at)
        ).all()
    if not waiting:
        return []
    pending = queue.pending_job_ids() if queue.depth() else set()
    sent = []
    for job_id in waiting:
        if job_id in pending:
            continue
        with session_scope(settings.db_url) as s:
            won = state.mark_enqueued(s, job_id, older_than=grace)
        if won:
            _enqueue(queue, job_id)
            sent.append(job_id)
    if sent:
        log.warning("queued job(s) %s had no queue message; sent again", ", ".join(sent))
    return sent


def _enqueue(queue: JobQueue, job_id: str) -> None:
    try:
        queue.enqueue(job_id)
    except Exception:  # the next sweep sends it
        log.exception("could not enqueue job %s", job_id)
