"""The job queue: huey carrying job ids only. The jobs table is the truth; the queue is just a doorbell.

SqliteHuey (a file in the data folder) by default; PostgresHuey or RedisHuey when workers on several
machines share one queue. A message for a job that is no longer ``queued`` is dropped when claimed, so
enqueueing twice is harmless, and re-enqueueing every queued job at startup loses nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from huey import Huey, PostgresHuey, RedisHuey, SqliteHuey, crontab

from app.settings import Settings

log = logging.getLogger(__name__)


def make_huey(settings: Settings) -> Huey:
    name = settings.queue_name
    if settings.queue_backend == "sqlite":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return SqliteHuey(name, filename=str(settings.data_dir / "queue.db"), results=False)
    if not settings.queue_url:
        raise ValueError(f"queue backend {settings.queue_backend} needs FINETUNE_QUEUE_URL")
    if settings.queue_backend == "postgres":
        dsn = settings.queue_url.replace("postgresql+psycopg://", "postgresql://")
        return PostgresHuey(name, dsn=dsn, results=False)
    return RedisHuey(name, url=settings.queue_url, results=False)


class JobQueue:
    """The huey instance with the service's two tasks registered on it.

    The API only enqueues; a worker process runs ``consumer()``. Both build this from the same settings,
    so the task names match.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.huey = make_huey(settings)
        self._run = self.huey.task(name="run_job", retries=0)(self._run_job)
        self.huey.periodic_task(crontab(minute="*"), name="recover_stale_jobs")(self._recover)

    def _run_job(self, job_id: str) -> None:
        from app.jobs.worker import execute_job  # imported in the worker only

        execute_job(self.settings, job_id)

    def _recover(self) -> None:
        from app.jobs.recovery import recover_jobs

        recover_jobs(self.settings, self, startup=False)

    def enqueue(self, job_id: str) -> None:
        self._run(job_id)

    def depth(self) -> int:
        """Messages waiting in the queue (not yet picked up by a worker)."""
        return int(self.huey.pending_count())

    def ping(self) -> bool:
        try:
            self.huey.pending_count()
            return True
        except Exception:
            log.exception("queue is not reachable")
            return False

    def consumer(self, workers: int) -> Any:
        return self.huey.create_consumer(
            workers=workers,
            worker_type="thread",
            periodic=True,
            check_worker_health=True,
            initial_delay=0.1,
            backoff=1.15,
            max_delay=1.0,
        )

    def close(self) -> None:
        try:
            self.huey.storage.close()
        except Exception:  # closing is best effort; some storages have nothing to close
            pass
