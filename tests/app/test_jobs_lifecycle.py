"""Jobs through the real queue, real worker processes and real job processes: success with live events,
one job at a time in order, cancel and resume, a killed job process, a killed worker, and recovery.

Training is tiny (LeNet, 32 px, 30 images); a job that must still be running when it is cancelled or
killed simply has more epochs. The worker tests run on SQLite only (see ``sqlite_only``)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db import session_scope
from app.db.tables import Job, JobMetric, utcnow
from app.jobs.queue import JobQueue
from app.jobs.recovery import recover_jobs
from app.settings import Settings
from tests.app.conftest import (
    assert_error,
    dataset_files,
    drop_pg_database,
    fresh_pg_database,
    job_processes,
    metrics_held,
    read_events,
    settings_env,
    sqlite_only,
    upload_zip,
    wait_for_job,
    wait_until,
)

API = "/api/v1/jobs"
TINY = {"model": "lenet", "weights": "none", "image_size": 32, "batch_size": 8}
FINISHED = ("succeeded", "failed", "cancelled")
LONG = 60  # epochs: long enough to still be running when a test cancels or kills it after epoch 1


@pytest.fixture
def dataset(client: TestClient) -> dict:
    return upload_zip(client, dataset_files(per_class=10))


def create(client: TestClient, dataset: dict, epochs: int) -> dict:
    r = client.post(API, json={"dataset_id": dataset["id"], **TINY, "epochs": epochs})
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def run_dir(settings: Settings, job_id: str) -> Path:
    return settings.data_dir / "runs" / job_id


def last_checkpoint_epoch(settings: Settings, job_id: str) -> int | None:
    """The epoch the run's ``last`` link points at (None before the first checkpoint)."""
    try:
        target = os.readlink(run_dir(settings, job_id) / "last")
    except FileNotFoundError:
        return None
    match = re.search(r"epoch-(\d+)$", target)
    assert match, target
    return int(match.group(1))


def wait_for_checkpoint(client: TestClient, settings: Settings, job_id: str) -> int:
    def ready() -> int | None:
        job = client.get(f"{API}/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        return last_checkpoint_epoch(settings, job_id) if job["status"] == "running" else None

    return int(wait_until(ready, 90, f"the first checkpoint of job {job_id}", interval=0.1))


def metric_attempts(settings: Settings, job_id: str) -> dict[int, int]:
    """{epoch: attempt that wrote it} straight from the table."""
    with session_scope(settings.db_url) as s:
        rows = s.execute(select(JobMetric.epoch, JobMetric.attempt).where(JobMetric.job_id == job_id)).all()
    return {int(epoch): int(attempt) for epoch, attempt in rows}


def assert_continued_from_checkpoint(settings: Settings, job: dict, checkpoint: int, epochs: int) -> None:
    """Epochs up to the checkpoint were trained once, by attempt 1; the rest by attempt 2."""
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2
    assert [m["epoch"] for m in job["metrics"]] == list(range(1, epochs + 1))
    attempts = metric_attempts(settings, job["id"])
    assert {e: a for e, a in attempts.items() if e <= checkpoint} == dict.fromkeys(range(1, checkpoint + 1), 1)
    assert {e: a for e, a in attempts.items() if e > checkpoint} == dict.fromkeys(range(checkpoint + 1, epochs + 1), 2)
    assert job["model_id"]


def wait_gone(job_id: str, timeout: float = 15) -> None:
    wait_until(lambda: not job_processes(job_id), timeout, f"the job process of {job_id} to exit")


# -- with a worker ------------------------------------------------------------------------------------------


@sqlite_only
def test_jobs_succeed_one_at_a_time_in_order_with_live_events(
    client: TestClient, dataset: dict, settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    job = create(client, dataset, epochs=3)
    second = create(client, dataset, epochs=2)
    skipped = create(client, dataset, epochs=2)
    assert client.post(f"{API}/{skipped['id']}/cancel").json()["status"] == "cancelled"

    # the first job, live from the queue to its end
    events = read_events(client, job["id"])
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "reset" and kinds[-1] == "end", kinds
    assert set(kinds) == {"reset", "job", "metric", "end"} and kinds.count("reset") == 1  # nothing rewritten
    assert events[-1][1] == {"id": job["id"], "status": "succeeded"}
    metrics = metrics_held(events)
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and {m["attempt"] for m in metrics} == {1}
    assert all(0 <= m["train_acc"] <= 1 and m["train_loss"] > 0 and m["stage"] == "finetune" for m in metrics)
    statuses = [data["status"] for kind, data in events if kind == "job"]
    assert statuses[-1] == "succeeded" and "running" in statuses
    order = ["queued", "running", "succeeded"]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses), statuses
    assert events[-2][1]["model_id"]  # the last job event carries the model

    done = client.get(f"{API}/{job['id']}").json()
    assert done["status"] == "succeeded" and done["attempt"] == 1 and done["progress"] == 1.0
    assert done["epoch"] == done["total_epochs"] == 3
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    assert [m["epoch"] for m in done["metrics"]] == [1, 2, 3] and done["model_id"] == events[-2][1]["model_id"]
    assert (run_dir(settings, job["id"]) / "run.json").is_file()
    wait_gone(job["id"])

    # reconnecting to a finished job replays its metrics and ends
    replay = read_events(client, job["id"], timeout=20)
    assert [kind for kind, _ in replay] == ["reset", "job", "end"]
    assert replay[0][1] == {"attempt": 1, "metrics": done["metrics"]}

    # one at a time: the second job started after the first ended
    b = wait_for_job(client, second["id"], FINISHED)
    assert b["status"] == "succeeded", b
    assert datetime.fromisoformat(b["started_at"]) >= datetime.fromisoformat(done["finished_at"])

    # the worker took the cancelled job's message after the others and dropped it
    log = settings.data_dir.parent / "worker.log"
    wait_until(lambda: f"job {skipped['id']} is not queued any more" in log.read_text(), 30, "the worker to skip it")
    c = client.get(f"{API}/{skipped['id']}").json()
    assert c["status"] == "cancelled" and c["attempt"] == 0 and c["started_at"] is None and c["metrics"] == []
    assert not run_dir(settings, skipped["id"]).exists()

    # a finished job with a model can be deleted; the model keeps the run folder
    assert client.delete(f"{API}/{job['id']}").status_code == 204
    assert (run_dir(settings, job["id"]) / "run.json").is_file()


@sqlite_only
def test_cancel_a_running_job_then_resume_it_from_its_checkpoint(
    client: TestClient, dataset: dict, settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    job = create(client, dataset, epochs=LONG)
    wait_for_checkpoint(client, settings, job["id"])
    assert job_processes(job["id"])
    # while it runs, neither it nor its dataset can be deleted, nor can it be resumed
    assert_error(client.delete(f"{API}/{job['id']}"), 409, "job_active")
    assert_error(client.delete(f"/api/v1/datasets/{dataset['id']}"), 409, "in_use")
    assert_error(client.post(f"{API}/{job['id']}/resume"), 409, "not_resumable")

    r = client.post(f"{API}/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    cancelled = wait_for_job(client, job["id"], FINISHED, timeout=30)
    assert cancelled["status"] == "cancelled", cancelled
    assert cancelled["epoch"] < LONG, "the job finished before the cancel reached it"
    wait_gone(job["id"])
    checkpoint = last_checkpoint_epoch(settings, job["id"])
    assert checkpoint is not None and 1 <= checkpoint < LONG
    assert [m["epoch"] for m in cancelled["metrics"]] == list(range(1, cancelled["epoch"] + 1))

    r = client.post(f"{API}/{job['id']}/resume")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["cancel_requested"] is False
    assert "checkpoint" in r.json()["message"]
    done = wait_for_job(client, job["id"], FINISHED)
    assert_continued_from_checkpoint(settings, done, checkpoint, LONG)


@sqlite_only
def test_a_killed_job_process_fails_the_job_which_can_be_resumed(
    client: TestClient, dataset: dict, settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    job = create(client, dataset, epochs=LONG)
    wait_for_checkpoint(client, settings, job["id"])
    (pid,) = job_processes(job["id"])
    os.kill(pid, signal.SIGKILL)
    failed = wait_for_job(client, job["id"], FINISHED, timeout=30)
    assert failed["status"] == "failed", failed
    assert failed["error_code"] == "process_died"
    assert "killed" in failed["error"] and "resume" in failed["error"]
    assert worker.poll() is None  # the worker lives on
    checkpoint = last_checkpoint_epoch(settings, job["id"])
    assert checkpoint is not None

    assert client.post(f"{API}/{job['id']}/resume").status_code == 202
    done = wait_for_job(client, job["id"], FINISHED)
    assert_continued_from_checkpoint(settings, done, checkpoint, LONG)


@sqlite_only
def test_the_event_stream_of_a_resumed_job_drops_the_dead_attempts_epochs(
    client: TestClient, dataset: dict, settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    """A two-stage job killed in its head stage (whose checkpoint is written when the stage ends) starts over
    when resumed. Its event stream begins with the dead attempt's epochs, as the page showed them, then tells
    the client to drop them; the client ends holding exactly the job's history, all of it from attempt 2."""
    r = client.post(
        API, json={"dataset_id": dataset["id"], **TINY, "strategy": "two-stage", "head_epochs": 200, "epochs": 1}
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_until(lambda: metric_attempts(settings, job_id), 90, "the first head epoch", interval=0.01)
    (pid,) = job_processes(job_id)
    os.kill(pid, signal.SIGKILL)
    failed = wait_for_job(client, job_id, FINISHED, timeout=30)
    assert failed["status"] == "failed", failed
    assert last_checkpoint_epoch(settings, job_id) is None, "the head stage ended before the kill"
    dead = failed["metrics"]
    assert dead and {m["attempt"] for m in dead} == {1}

    assert client.post(f"{API}/{job_id}/resume").status_code == 202
    events = read_events(client, job_id)
    done = client.get(f"{API}/{job_id}").json()
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    assert [m["epoch"] for m in done["metrics"]] == list(range(1, 202))
    assert {m["attempt"] for m in done["metrics"]} == {2}
    resets = [data for kind, data in events if kind == "reset"]
    assert resets[0]["metrics"] == dead  # where the page was when the stream started
    assert len(resets) >= 2 and all(m["attempt"] == 2 for reset in resets[1:] for m in reset["metrics"]), resets
    assert metrics_held(events) == done["metrics"]


@sqlite_only
def test_a_killed_worker_takes_its_job_process_along_and_a_new_worker_resumes_the_job(
    client: TestClient, dataset: dict, settings: Settings, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    first = start_worker()
    job = create(client, dataset, epochs=LONG)
    wait_for_checkpoint(client, settings, job["id"])
    assert job_processes(job["id"])
    first.kill()
    first.wait()
    wait_gone(job["id"], timeout=10)  # PR_SET_PDEATHSIG: the job process died with its worker
    checkpoint = last_checkpoint_epoch(settings, job["id"])
    assert checkpoint is not None
    assert client.get(f"{API}/{job['id']}").json()["status"] == "running"  # nobody could record anything

    start_worker()
    done = wait_for_job(client, job["id"], FINISHED)
    assert_continued_from_checkpoint(settings, done, checkpoint, LONG)


@sqlite_only
def test_a_killed_worker_before_the_first_checkpoint_fails_the_job_on_restart(
    client: TestClient, dataset: dict, settings: Settings, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    first = start_worker()
    job = create(client, dataset, epochs=2)
    wait_until(lambda: job_processes(job["id"]), 60, "the job process to start", interval=0.02)
    first.kill()
    first.wait()
    wait_gone(job["id"], timeout=10)
    assert last_checkpoint_epoch(settings, job["id"]) is None, "the job saved a checkpoint before it was killed"

    start_worker()
    failed = wait_for_job(client, job["id"], FINISHED, timeout=60)
    assert failed["status"] == "failed", failed
    assert failed["error_code"] == "worker_lost"
    assert "stopped before its first checkpoint" in failed["error"] and "resume" in failed["error"]

    assert client.post(f"{API}/{job['id']}/resume").status_code == 202
    done = wait_for_job(client, job["id"], FINISHED)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    assert [m["epoch"] for m in done["metrics"]] == [1, 2]


@sqlite_only
def test_a_job_process_that_does_not_stop_is_terminated_after_the_grace_period(
    client: TestClient, dataset: dict, settings: Settings, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """Cancelled while its process is still starting (not yet looking at the cancel flag): the worker
    terminates it once cancel_grace_seconds have passed, and the job ends cancelled."""
    settings.cancel_grace_seconds = 0.1
    start_worker()
    job = create(client, dataset, epochs=LONG)
    wait_until(lambda: job_processes(job["id"]), 60, "the job process to start", interval=0.02)
    assert client.post(f"{API}/{job['id']}/cancel").json()["cancel_requested"] is True
    cancelled = wait_for_job(client, job["id"], FINISHED, timeout=30)
    assert cancelled["status"] == "cancelled", cancelled
    assert cancelled["metrics"] == [] and cancelled["error"] is None
    wait_gone(job["id"])
    assert "did not stop within" in (settings.data_dir.parent / "worker.log").read_text()


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def is_alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@sqlite_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_serve_stops_its_worker(settings: Settings, tmp_path: Path, sig: signal.Signals) -> None:
    """``serve`` runs a worker beside the API; stopping serve (``kill``, a service manager, even ``kill -9``)
    stops both: the worker never outlives it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
        )
        try:
            (worker_pid,) = wait_until(lambda: children(serve.pid), 60, "serve to start its worker")
            wait_until(lambda: b"worker" in (tmp_path / "serve.log").read_bytes(), 60, "the worker to start")
            serve.send_signal(sig)
            assert serve.wait(timeout=40) is not None
            wait_until(lambda: not is_alive(worker_pid), 30, "the worker to stop with serve")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


# -- recovery, without a worker (both databases) -----------------------------------------------------------


def hold(settings: Settings, job_id: str, worker: str, heartbeat: datetime) -> None:
    """Make a job look claimed by ``worker`` (attempt 1), last heard of at ``heartbeat``."""
    with session_scope(settings.db_url) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="running", attempt=1, worker=worker, heartbeat_at=heartbeat, started_at=heartbeat)
        )


def give_checkpoint(settings: Settings, job_id: str) -> None:
    checkpoint = run_dir(settings, job_id) / "checkpoints" / "epoch-0001"
    checkpoint.mkdir(parents=True)
    (run_dir(settings, job_id) / "last").symlink_to("checkpoints/epoch-0001")


def recover(settings: Settings, *, startup: bool) -> tuple[list[str], int]:
    """Run the recovery as a worker does; returns (requeued ids, messages it added to the queue)."""
    queue = JobQueue(settings)
    try:
        before = queue.depth()
        requeued = recover_jobs(settings, queue, startup=startup)
        return requeued, queue.depth() - before
    finally:
        queue.close()


def test_recovery_of_jobs_whose_heartbeat_stopped(client: TestClient, dataset: dict, settings: Settings) -> None:
    """The periodic check: a running job without a heartbeat for stale_after_seconds is lost; with a checkpoint
    it is queued again to resume, without one it fails with the reason. A live job is left alone."""
    with_checkpoint, without, alive = (create(client, dataset, epochs=2) for _ in range(3))
    stale = utcnow() - timedelta(seconds=settings.stale_after_seconds + 30)
    hold(settings, with_checkpoint["id"], "elsewhere:1", stale)
    hold(settings, without["id"], "elsewhere:2", stale)
    hold(settings, alive["id"], "elsewhere:3", utcnow())
    give_checkpoint(settings, with_checkpoint["id"])

    assert recover(settings, startup=False) == ([with_checkpoint["id"]], 1)

    a = client.get(f"{API}/{with_checkpoint['id']}").json()
    assert a["status"] == "queued" and a["attempt"] == 1 and "checkpoint" in a["message"]
    b = client.get(f"{API}/{without['id']}").json()
    assert b["status"] == "failed" and b["error_code"] == "worker_lost" and b["finished_at"]
    assert "before its first checkpoint" in b["error"]
    assert client.get(f"{API}/{alive['id']}").json()["status"] == "running"


def test_recovery_at_worker_startup(client: TestClient, dataset: dict, settings: Settings) -> None:
    """At startup a worker also takes back jobs whose worker process on this host is gone (without waiting
    for the heartbeat to go stale) and enqueues every queued job again."""
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        jobs = [create(client, dataset, epochs=2) for _ in range(5)]
        dead_holder, same_pid_holder, live_holder, other_host, queued = (j["id"] for j in jobs)
        now = utcnow()
        hold(settings, dead_holder, f"{host}:{dead.pid}", now)
        give_checkpoint(settings, dead_holder)
        # held under this very pid: by an earlier process that had it (a restarted container's PID 1)
        hold(settings, same_pid_holder, f"{host}:{os.getpid()}", now)
        hold(settings, live_holder, f"{host}:{alive.pid}", now)
        hold(settings, other_host, "another-host:1", now)

        assert recover(settings, startup=True) == ([dead_holder, queued], 2)
    finally:
        alive.kill()
        alive.wait()

    status = {j["id"]: client.get(f"{API}/{j['id']}").json() for j in jobs}
    assert status[dead_holder]["status"] == "queued"
    assert status[same_pid_holder]["status"] == "failed"
    assert status[same_pid_holder]["error_code"] == "worker_lost"
    assert status[live_holder]["status"] == "running"
    assert status[other_host]["status"] == "running"
    assert status[queued]["status"] == "queued"


# -- the queue backends -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "redis"])
def test_queue_backends_carry_job_ids_in_order(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """What the API enqueues, a worker (another JobQueue on the same settings) takes, first in first out."""
    with contextlib.ExitStack() as cleanup:
        url = None
        if backend == "postgres":
            admin = request.getfixturevalue("pg_server")
            url, name = fresh_pg_database(admin)
            cleanup.callback(drop_pg_database, admin, name)
        elif backend == "redis":
            url = "redis://127.0.0.1:6379/0"
        settings = Settings(
            data_dir=tmp_path / "data", queue_backend=backend, queue_url=url, queue_name=f"test-{tmp_path.name}"
        )
        api, worker = JobQueue(settings), JobQueue(settings)
        cleanup.callback(worker.close)
        cleanup.callback(api.close)
        cleanup.callback(api.huey.flush)

        assert api.ping()
        api.enqueue("job-1")
        api.enqueue("job-2")
        assert api.depth() == worker.depth() == 2
        taken = [worker.huey.dequeue() for _ in range(2)]
        assert [(t.name, t.args) for t in taken] == [("run_job", ("job-1",)), ("run_job", ("job-2",))]
        assert api.depth() == 0


def test_an_unreachable_queue_is_reported_not_raised(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", queue_backend="redis", queue_url="redis://127.0.0.1:1/0")
    queue = JobQueue(settings)
    assert queue.ping() is False
    with pytest.raises(ValueError, match="needs FINETUNE_QUEUE_URL"):
        JobQueue(Settings(data_dir=tmp_path / "data", queue_backend="postgres"))
