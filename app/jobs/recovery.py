"""Recovering jobs whose process died: never leave a job `running` with nobody running it.

A running job is lost when its heartbeat is stale, or, at a worker's startup, when it was held by a
process on this host that no longer exists. A lost job with a checkpoint goes back to the queue and
resumes from it; one without fails with the reason. Queued jobs are enqueued again at startup (claiming
is idempotent), so a lost queue message never loses a job.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from sqlalchemy import select

from app.db import session_scope
from app.db.tables import Job, utcnow
from app.jobs import state
from app.settings import Settings
from app.storage import Storage

if TYPE_CHECKING:
    from app.jobs.queue import JobQueue

log = logging.getLogger(__name__)


def _holder_is_dead(worker: str | None) -> bool:
    """True when the job's worker ran on this host and its process is gone. Called at startup, before this
    process has claimed anything: a job held under our own identity was held by an earlier process that had
    our pid (a restarted container's worker is PID 1 again)."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_jobs(settings: Settings, queue: JobQueue, *, startup: bool) -> list[str]:
    """Requeue or fail lost running jobs; at startup also re-enqueue queued jobs. Returns requeued ids."""
    storage = Storage(settings.data_dir)
    now = utcnow()
    requeue: list[str] = []
    with session_scope(settings.db_url) as s:
        for job in s.scalars(select(Job).where(Job.status == "running")):
            lost = state.is_stale(job, now, settings.stale_after_seconds) or (startup and _holder_is_dead(job.worker))
            if not lost:
                continue
            if (storage.path(job.run_key) / "last").exists():
                ok = state.fenced_update(
                    s,
                    job.id,
                    job.attempt,
                    status="queued",
                    worker=None,
                    message="resuming from the last checkpoint after the worker stopped",
                )
                if ok:
                    requeue.append(job.id)
                    log.warning("job %s was running in a process that died; resuming it", job.id)
            else:
                state.finish(
                    s,
                    job.id,
                    job.attempt,
                    "failed",
                    error_code="worker_lost",
                    error="the process running this job stopped before its first checkpoint was saved; "
                    "resume the job to start it again",
                    message="failed",
                )
                log.warning("job %s was running in a process that died before any checkpoint; failed", job.id)
        if startup:
            queued = s.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.created_at)).all()
            requeue.extend(j for j in queued if j not in requeue)
    for job_id in requeue:
        queue.enqueue(job_id)
    return requeue
