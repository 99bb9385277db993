"""Crash safety under fault injection: kill -9 the job process, the worker or the whole service at a random
point of a running job, restart what was killed, and check what must always hold.

- No accepted job is lost or left ``running``: it ends ``succeeded``, retried on its own after each kill
  (from its last checkpoint, or from the start).
- Whatever ``last`` and ``best`` point at is a whole checkpoint that loads (weights, training state, the
  predictor); a temporary (``.tmp-*``) folder is never pointed at.
- Each epoch has one metrics row, and at the end they are 1..N.
- Two workers on one queue never run the same attempt, and a stale attempt's late writes are refused.

Random points come from a seeded RNG (``FINETUNE_FAULT_SEED`` to try others, ``FINETUNE_FAULT_ITERATIONS``
for more kills than one of each kind; the seed is in every failure message). Training is tiny (LeNet, 32 px, 30 images); SQLite only (see ``sqlite_only``).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.db.tables import Job, JobMetric, Worker
from app.jobs import state, worker
from app.jobs.child import JobReporter, Superseded
from app.jobs.child import run as run_child
from app.jobs.queue import JobQueue
from app.settings import Settings
from finetune.checkpoint import MODEL_FILE, STATE_FILE, load_checkpoint
from finetune.events import EpochEnd, RunStarted
from finetune.predict import Predictor
from tests.app.conftest import (
    dataset_files,
    job_processes,
    settings_env,
    sqlite_only,
    upload_zip,
    wait_for_job,
    wait_until,
)
from tests.app.test_jobs_lifecycle import (
    API,
    FINISHED,
    children,
    create,
    last_checkpoint_epoch,
    metric_attempts,
    run_dir,
    wait_for_checkpoint,
    wait_gone,
)
from tests.smallfs import fill, free_space, small_filesystem

SEED = int(os.environ.get("FINETUNE_FAULT_SEED", "1306"))
ITERATIONS = int(os.environ.get("FINETUNE_FAULT_ITERATIONS", "3"))
EPOCHS = 20  # ~2 s of training after ~4 s of start-up here, one save per epoch
STARTED = re.compile(r"job (\w+) attempt (\d+): started process (\d+)")


@pytest.fixture
def dataset(client: TestClient) -> dict:
    return upload_zip(client, dataset_files(per_class=10))


# -- what must hold -----------------------------------------------------------------------------------------


def assert_checkpoints_whole(folder: Path) -> None:
    """``last`` and ``best`` (where they exist) point at whole checkpoints that load, never at a temporary
    folder; with a checkpoint, the predictor loads too."""
    for which in ("last", "best"):
        link = folder / which
        if not link.is_symlink():
            continue
        target = os.readlink(link)
        assert re.fullmatch(r"checkpoints/epoch-\d{4}", target), f"{which} -> {target}"
        ckpt = load_checkpoint(folder, which)
        assert ckpt.path.name == Path(target).name and ckpt.epoch == int(target[-4:])
        assert (ckpt.path / MODEL_FILE).is_file() and (ckpt.path / STATE_FILE).is_file()
        assert ckpt.state_dict() and ckpt.train_state()["stage"] == "finetune"
    if (folder / "last").is_symlink():
        assert Predictor.from_run(folder, device="cpu").classes == ["blue", "green", "red"]


def assert_finished_whole(client: TestClient, settings: Settings, job: dict, epochs: int) -> None:
    assert job["status"] == "succeeded" and job["error"] is None, job
    assert [m["epoch"] for m in job["metrics"]] == list(range(1, epochs + 1)), job["metrics"]
    assert all(1 <= a <= job["attempt"] for a in metric_attempts(settings, job["id"]).values())
    folder = run_dir(settings, job["id"])
    assert last_checkpoint_epoch(settings, job["id"]) == epochs
    assert_checkpoints_whole(folder)
    assert [p.name for p in (folder / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert job["model_id"] and client.get(f"/api/v1/models/{job['model_id']}").status_code == 200


def assert_one_process_per_attempt(logs: list[Path]) -> Counter[tuple[str, int]]:
    """Every (job, attempt) the workers started was started once, by one process."""
    started: Counter[tuple[str, int]] = Counter()
    for log in logs:
        for job_id, attempt, _pid in STARTED.findall(log.read_text(errors="replace")):
            started[(job_id, int(attempt))] += 1
    assert started and max(started.values()) == 1, started
    return started


def worker_of(settings: Settings, job_id: str) -> str | None:
    with session_scope(settings.db_url) as s:
        return s.scalar(select(Job.worker).where(Job.id == job_id))


# -- the service, as `serve` runs it ----------------------------------------------------------------------


class Serve:
    """``python -m app.cli serve`` (API + supervised worker) in its own process group; one log for all of its
    starts."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log_path = log
        self.log: IO[bytes] = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[bytes] | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
            env=settings_env(self.settings),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def worker_pid(self) -> int | None:
        assert self.proc is not None
        found = children(self.proc.pid)
        return found[0] if found else None

    def kill(self) -> None:
        """kill -9 the whole process group: serve and its worker (the job process dies with the worker)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def serve(settings: Settings, tmp_path: Path) -> Iterator[Serve]:
    service = Serve(settings, tmp_path / "serve.log")
    service.start()
    try:
        yield service
    finally:
        service.stop()


def wait_for_kill_point(rng: random.Random, settings: Settings, job_id: str) -> str:
    """Wait for a random point of a job that was just claimed: a time during its start-up (before any
    checkpoint), or a random time into the epoch after a random one (which may be mid-save). Says which."""
    if rng.random() < 0.35:
        delay = rng.uniform(0, 3.0)
        time.sleep(delay)
        return f"{delay:.2f}s after the claim"
    epoch, extra = rng.randint(1, EPOCHS - 2), rng.uniform(0, 0.12)

    def reached() -> bool:
        with session_scope(settings.db_url) as s:
            row = s.execute(select(Job.status, Job.epoch).where(Job.id == job_id)).one()
        return row.status != "running" or row.epoch >= epoch

    wait_until(reached, 90, f"epoch {epoch} of job {job_id}", interval=0.01)
    time.sleep(extra)
    return f"{extra:.2f}s after epoch {epoch} ended"


def nice_of(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[16])


def kill_and_restart(target: str, job_id: str, serve: Serve) -> str:
    """kill -9 ``target`` now and restart it the way it is restarted in production; returns what was done."""
    if target == "child":
        pids = job_processes(job_id)
        if not pids:
            return "nothing to kill: the job process had already exited"
        with session_scope(serve.settings.db_url) as s:
            reported = s.scalar(select(Job.message).where(Job.id == job_id)) != "starting"
        if reported:  # past its start-up (it lowers its priority first thing): training yields the CPU to the API
            assert nice_of(pids[0]) == 10
        os.kill(pids[0], signal.SIGKILL)  # the worker lives on and records that its job process died
        wait_gone(job_id)
        return f"killed job process {pids[0]}"
    if target == "worker":
        pid = serve.worker_pid()
        assert pid is not None, "serve has no worker"
        os.kill(pid, signal.SIGKILL)  # serve's supervisor starts another; it recovers the job at startup
        wait_gone(job_id)
        return f"killed worker {pid}"
    serve.kill()
    wait_gone(job_id)
    serve.start()  # what a service manager does
    wait_until(serve.healthy, 60, "serve to answer again", interval=0.1)
    return "killed serve and restarted it"


@sqlite_only
@pytest.mark.slow
def test_random_kills_lose_no_job_and_no_checkpoint(
    client: TestClient, dataset: dict, settings: Settings, serve: Serve
) -> None:
    rng = random.Random(SEED)
    kinds = ["child", "worker", "serve"]
    targets = rng.sample(kinds, 3) + [rng.choice(kinds) for _ in range(ITERATIONS - 3)]
    done: list[str] = []
    for i, target in enumerate(targets):
        job = create(client, dataset, epochs=EPOCHS)
        wait_for_job(client, job["id"], ("running", *FINISHED), timeout=60)
        when = wait_for_kill_point(rng, settings, job["id"])
        at = client.get(f"{API}/{job['id']}").json()
        what = kill_and_restart(target, job["id"], serve)
        note = f"seed {SEED}, iteration {i}: {what} {when} ({at['status']}, {at['message']!r})"
        done.append(note)
        # Nothing is writing the run folder now (the worker restarts after a back-off): what is there is whole.
        assert_checkpoints_whole(run_dir(settings, job["id"]))

        # A killed process or worker is retried on its own (from the last checkpoint, or from the start).
        ended = wait_for_job(client, job["id"], FINISHED, timeout=90)
        assert ended["status"] == "succeeded", (note, ended)
        assert ended["retries"] <= 1, (note, ended)
        assert_finished_whole(client, settings, ended, EPOCHS)
        wait_gone(job["id"])
    print("\n".join(done))
    assert_one_process_per_attempt([serve.log_path])


@sqlite_only
@pytest.mark.slow
def test_two_workers_on_one_queue_never_run_the_same_attempt(
    client: TestClient, dataset: dict, settings: Settings, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """Two workers start at once on one queue that carries the job three times; the one that claimed it is
    killed at a random point and another worker started in its place. Each attempt runs in exactly one process."""
    rng = random.Random(SEED + 1)
    workers = [start_worker(), start_worker()]
    jobs = [create(client, dataset, epochs=EPOCHS)]
    queue = JobQueue(settings)
    try:
        for _ in range(2):
            queue.enqueue(jobs[0]["id"])  # duplicate messages: both workers try to claim the same job
    finally:
        queue.close()

    first = wait_for_job(client, jobs[0]["id"], ("running", *FINISHED), timeout=60)
    wait_for_kill_point(rng, settings, first["id"])
    holder = worker_of(settings, first["id"])
    if holder:
        with session_scope(settings.db_url) as s:
            pid = s.scalar(select(Worker.pid).where(Worker.id == holder))
        victim = next(w for w in workers if w.pid == pid)
        victim.kill()
        victim.wait()
        wait_gone(first["id"])
        assert_checkpoints_whole(run_dir(settings, first["id"]))
        workers.append(start_worker())  # recovers the job it held

    for job in jobs:
        ended = wait_for_job(client, job["id"], FINISHED, timeout=120)
        assert_finished_whole(client, settings, ended, EPOCHS)

    logs = sorted(settings.data_dir.parent.glob("worker*.log"))
    started = assert_one_process_per_attempt(logs)
    for job in jobs:
        final = client.get(f"{API}/{job['id']}").json()["attempt"]
        assert (job["id"], final) in started
    text = "".join(log.read_text(errors="replace") for log in logs)
    # The duplicate messages found the job taken and were dropped.
    assert text.count(f"job {jobs[0]['id']} is not queued any more") >= 2


# -- a full disk ------------------------------------------------------------------------------------------


@sqlite_only
@pytest.mark.slow
def test_a_full_disk_fails_the_job_with_the_reason_and_the_service_keeps_answering(
    client: TestClient, dataset: dict, settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    """The run folders on a real small filesystem that fills up while the job trains: the job fails with the
    disk-full reason, its last checkpoint stays whole, the service answers; with space again it resumes."""
    with small_filesystem(settings.data_dir / "runs", "16m") as runs:
        job = create(client, dataset, epochs=EPOCHS)
        checkpoint = wait_for_checkpoint(client, settings, job["id"])

        def stopped() -> bool:
            # Keep it full but for 64 KiB (each save's retention frees the checkpoint before): a checkpoint no
            # longer fits, while run.json's "failed" still does, as on a real disk that fills up.
            fill(runs, leave=64 * 1024)
            return bool(client.get(f"{API}/{job['id']}").json()["status"] != "running")

        wait_until(stopped, 60, "the job to stop on the full disk", interval=0.02)
        failed = client.get(f"{API}/{job['id']}").json()
        assert failed["status"] == "failed" and failed["error_code"] == "training_failed", failed
        assert failed["error"] == "the disk is full: the last good checkpoint is kept; free space and resume the job"
        wait_gone(job["id"])
        assert checkpoint <= (last_checkpoint_epoch(settings, job["id"]) or 0) < EPOCHS
        assert_checkpoints_whole(run_dir(settings, job["id"]))
        assert not [p for p in (run_dir(settings, job["id"]) / "checkpoints").iterdir() if p.name.startswith(".tmp-")]

        # The service answers meanwhile (its database and uploads are on another disk).
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        assert client.get(API).status_code == 200
        upload_zip(client, dataset_files(per_class=3, seed=1), name="while-full")
        assert worker.poll() is None

        free_space(runs)
        assert client.post(f"{API}/{job['id']}/resume").status_code == 202
        done = wait_for_job(client, job["id"], FINISHED, timeout=90)
        assert_finished_whole(client, settings, done, EPOCHS)
        assert done["attempt"] == 2
        wait_gone(job["id"])


# -- fencing, without processes (both databases) ------------------------------------------------------------


def epoch_end(epoch: int, loss: float) -> EpochEnd:
    return EpochEnd(epoch, 4, "finetune", loss, 0.5, loss, 0.5, 0.01, 100.0, 0.1, 1.0, None, False)


def run_started(resumed_from: int) -> RunStarted:
    return RunStarted("run", "lenet", "full", 3, 20, 5, 5, 4, "cpu", resumed_from_epoch=resumed_from)


def test_a_stale_attempt_cannot_write_after_the_job_was_claimed_again(
    client: TestClient, dataset: dict, settings: Settings
) -> None:
    job_id = create(client, dataset, epochs=4)["id"]
    with session_scope(settings.db_url) as s:
        assert state.claim(s, job_id, "host:1") == 1
    stale = JobReporter(settings, job_id, 1)
    stale.on_run_started(run_started(0))
    stale.on_epoch_end(epoch_end(1, 1.0))

    # Attempt 1 is lost (recovery puts the job back in the queue) and another process claims attempt 2.
    with session_scope(settings.db_url) as s:
        assert state.requeue(s, job_id, 1, "lost", retry=True, max_retries=3) is state.Requeued.REQUEUED
    with session_scope(settings.db_url) as s:
        assert state.claim(s, job_id, "host:2") == 2
        assert state.claim(s, job_id, "host:3") is None  # a duplicate message finds it taken: claims nothing
    fresh = JobReporter(settings, job_id, 2)
    fresh.on_run_started(run_started(1))
    fresh.on_epoch_end(epoch_end(2, 0.5))

    # Everything attempt 1 still tries is refused and changes nothing.
    with session_scope(settings.db_url) as s:
        assert not state.fenced_update(s, job_id, 1, message="stale", heartbeat_at=None)
        assert not state.succeed(s, job_id, 1, progress=1.0)
        assert not state.fail(s, job_id, 1, "late", "training_failed")
        assert state.requeue(s, job_id, 1, "late", retry=True, max_retries=3) is state.Requeued.LOST
        assert state.should_stop(s, job_id, 1)  # so its process stops
        assert not state.renew(s, job_id, 1, 12.0).held
    with pytest.raises(Superseded):
        stale.on_run_started(run_started(0))  # would delete the rows after epoch 0: rolled back
    stale.on_epoch_end(epoch_end(2, 9.0))
    stale.on_epoch_end(epoch_end(3, 9.0))
    assert stale.should_stop()
    killed = worker.JobWorker(settings)
    try:  # its worker records its death (out of memory?): ignored, attempt 1 does not hold the job
        killed._record_exit(job_id, 1, worker.ChildExit(-signal.SIGKILL))
    finally:
        killed.queue.close()

    with session_scope(settings.db_url) as s:
        row = s.get(Job, job_id)
        assert row is not None
        assert (row.status, row.attempt, row.worker, row.error) == ("running", 2, "host:2", None)
        assert row.message == "epoch 2/4 done" and row.epoch == 2
        metrics = s.execute(select(JobMetric.epoch, JobMetric.attempt, JobMetric.train_loss)).all()
    assert sorted(tuple(m) for m in metrics) == [(1, 1, 1.0), (2, 2, 0.5)]
    assert not fresh.should_stop()


@sqlite_only
def test_a_run_folder_left_by_an_attempt_killed_before_its_run_started_is_reused(
    client: TestClient, dataset: dict, settings: Settings
) -> None:
    """Killed after the engine wrote dataset.json but before run.json: the next attempt starts afresh in the
    same folder (the engine refuses a non-empty folder for a new run)."""
    job_id = create(client, dataset, epochs=1)["id"]
    folder = run_dir(settings, job_id)
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text("{}")
    (folder / ".run.json.1234abcd.tmp").write_text("{")
    with session_scope(settings.db_url) as s:
        attempt = state.claim(s, job_id, "host:1")
    assert attempt == 1
    assert run_child(settings, job_id, attempt) == 0
    job = client.get(f"{API}/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert_checkpoints_whole(folder)
