"""The job queue: huey carrying job ids only. The jobs table is the truth; the queue is just a doorbell.

SqliteHuey (a file in the data folder) by default; PostgresHuey or RedisHuey when workers on several
machines share one queue. A message for a job that is no longer ``queued`` is dropped when claimed, so
enqueueing twice is harmless; a queued job whose message was lost (a queue restarted without persistence,
an enqueue that failed after the row was committed) is sent another by the workers' sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from huey import Huey, PostgresHuey, RedisHuey, SqliteHuey

from app.settings import Settings

log = logging.getLogger(__name__)
RUN_JOB = "run_job"


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
    """The huey instance with the service's task registered on it.

    The API only enqueues; a worker passes ``runner``, the function that runs a job, and its consumer
    threads take messages with ``huey.dequeue()``. Both build this from the same settings, so the task names
    match. There is no periodic task: recovery runs on each worker's own thread (a periodic task would wait
    in the queue behind hour-long jobs).
    """

    def __init__(self, settings: Settings, runner: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.huey = make_huey(settings)
        self._runner = runner
        self._run = self.huey.task(name=RUN_JOB, retries=0)(self._run_job)

    def _run_job(self, job_id: str) -> None:
        if self._runner is None:
            raise RuntimeError("this queue only enqueues (it was built without a runner)")
        self._runner(job_id)

    def enqueue(self, job_id: str) -> None:
        self._run(job_id)

    def depth(self) -> int:
        """Messages waiting in the queue (not yet picked up by a worker)."""
        return int(self.huey.pending_count())

    def pending_job_ids(self, limit: int = 100_000) -> set[str]:
        """The job ids of the messages waiting in the queue (messages of unknown tasks are skipped)."""
        ids = set()
        for raw in self.huey.storage.enqueued_items(limit):
            try:
                task = self.huey.deserialize_task(raw)
            except Exception:
                continue
            if task.name == RUN_JOB and task.args:
                ids.add(str(task.args[0]))
        return ids

    def ping(self) -> bool:
        try:
            self.huey.pending_count()
            return True
        except Exception:
            log.exception("queue is not reachable")
            return False

    def close(self) -> None:
        try:
            self.huey.storage.close()
        except Exception:  # closing is best effort; some storages have nothing to close
            pass
