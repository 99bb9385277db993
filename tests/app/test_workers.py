"""Workers as the operator sees them: the registry (GET /api/v1/workers, /metrics), a graceful drain on
SIGTERM, ImageNet weights checked where jobs run, and a multi-host configuration on SQLite refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import session_scope
from app.db.tables import Worker
from app.jobs import state
from app.settings import Settings
from tests.app.conftest import (
    Account,
    assert_error,
    authed_client,
    dataset_files,
    make_account,
    sqlite_only,
    upload_zip,
    wait_for_job,
    wait_until,
)
from tests.app.test_jobs_lifecycle import (
    API,
    FINISHED,
    LONG,
    assert_continued_from_checkpoint,
    create,
    job_processes,
    last_checkpoint_epoch,
    run_dir,
    wait_for_checkpoint,
    wait_gone,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dataset(client: TestClient) -> dict:
    return upload_zip(client, dataset_files(per_class=10))


def workers(client: TestClient) -> list[dict]:
    r = client.get("/api/v1/workers")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def register(settings: Settings, worker_id: str, host: str, weights: list[str], lease: float) -> None:
    with session_scope(settings.db_url) as s:
        state.register_worker(
            s, lease, id=worker_id, host=host, pid=1, slots=1, devices=[], weights=weights, draining=False
        )


@sqlite_only
def test_sigterm_drains_the_worker_and_another_continues_the_job(
    client: TestClient, dataset: dict, settings: Settings, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """SIGTERM: the job stops at its next batch boundary, goes back to the queue at once (not after a lease
    lapses), the worker exits within the drain timeout, and another worker continues the job from its last
    checkpoint. A drain is not a retry: nothing is counted against the job."""
    first = start_worker()
    job = create(client, dataset, epochs=LONG)
    wait_for_checkpoint(client, settings, job["id"])
    (held,) = [w for w in workers(client) if w["state"] == "running"]
    assert held["jobs"] == [job["id"]] and held["pid"] == first.pid

    first.send_signal(signal.SIGTERM)
    start = time.monotonic()
    requeued = wait_for_job(client, job["id"], ("queued", *FINISHED), timeout=30)
    assert requeued["status"] == "queued", requeued
    assert "shut down" in requeued["message"] and requeued["retries"] == 0
    assert first.wait(timeout=settings.drain_timeout_seconds + 10) == 0
    took = time.monotonic() - start
    assert took < settings.drain_timeout_seconds
    wait_gone(job["id"])
    checkpoint = last_checkpoint_epoch(settings, job["id"])
    assert checkpoint is not None
    (gone,) = [w for w in workers(client) if w["id"] == held["id"]]
    assert gone["state"] == "stopped" and gone["jobs"] == []

    start_worker()
    done = wait_for_job(client, job["id"], FINISHED)
    assert_continued_from_checkpoint(settings, done, checkpoint, LONG)
    assert done["retries"] == 0
    log = (settings.data_dir.parent / "worker.log").read_text()
    assert "draining" in log and "stopped for its worker's drain" not in log  # that is the child's log
    child_log = (settings.data_dir / "logs" / f"job-{job['id']}-1.log").read_text()
    assert "stopped for its worker's drain" in child_log


@sqlite_only
def test_a_drain_that_outlasts_its_timeout_kills_the_job_and_requeues_it(
    client: TestClient, dataset: dict, settings: Settings, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """A job that does not reach a batch boundary in time (here: its process is frozen with SIGSTOP) is
    killed at the drain deadline and requeued all the same; the worker's exit is bounded."""
    settings.drain_timeout_seconds = 0.5
    first = start_worker()
    job = create(client, dataset, epochs=LONG)
    (pid,) = wait_until(lambda: job_processes(job["id"]), 60, "the job process to start", interval=0.02)
    os.kill(pid, signal.SIGSTOP)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0
    wait_gone(job["id"])
    after = client.get(f"{API}/{job['id']}").json()
    assert after["status"] == "queued" and after["retries"] == 0, after
    assert "did not stop before the drain deadline" in (settings.data_dir.parent / "worker.log").read_text()


def test_the_registry_and_metrics_show_each_worker(client: TestClient, settings: Settings) -> None:
    register(settings, "a" * 32, "gpu-host-1", ["resnet18"], lease=30)
    register(settings, "b" * 32, "gpu-host-2", [], lease=-1)  # its lease lapsed: lost
    with session_scope(settings.db_url) as s:
        s.execute(update(Worker).where(Worker.id == "a" * 32).values(devices=["0", "1"], slots=2))
    listed = {w["id"]: w for w in workers(client)}
    a, b = listed["a" * 32], listed["b" * 32]
    assert (a["host"], a["state"], a["slots"], a["devices"], a["weights"]) == (
        "gpu-host-1", "running", 2, ["0", "1"], ["resnet18"],
    )  # fmt: skip
    assert a["jobs"] == [] and a["seconds_since_heartbeat"] < 30 and a["heartbeat_at"].endswith("Z")
    assert b["state"] == "lost"
    text = client.get("/metrics").text
    assert 'finetune_workers{state="running"} 1.0' in text and 'finetune_workers{state="lost"} 1.0' in text
    assert f'finetune_worker_slots{{host="gpu-host-1",state="running",worker="{"a" * 32}"}} 2.0' in text
    assert "finetune_worker_heartbeat_age_seconds{" in text


def test_the_registry_is_for_admins(client: TestClient, settings: Settings) -> None:
    user: Account = make_account(settings, "someone")
    with authed_client(client.app, user) as c:
        assert_error(c.get("/api/v1/workers"), 403, "forbidden")


def test_imagenet_weights_are_checked_on_the_workers(client: TestClient, dataset: dict, settings: Settings) -> None:
    """With live workers, the registry decides: a job needing weights no live worker holds is refused with the
    reason; one that a worker holds is accepted, though the API's own host has no weights file."""
    register(settings, "c" * 32, "gpu-host-1", ["resnet18"], lease=30)
    body = {"dataset_id": dataset["id"], "epochs": 1, "weights": "imagenet"}
    ok = client.post(API, json={**body, "model": "resnet18"})
    assert ok.status_code == 202, ok.text
    error = assert_error(client.post(API, json={**body, "model": "resnet50"}), 422, "weights_missing")
    assert "no running worker holds the ImageNet weights of resnet50" in error["message"]
    assert "gpu-host-1" in error["message"] and "finetune weights fetch resnet50" in error["message"]


def test_with_several_hosts_and_no_live_worker_a_job_waits_for_its_weights(
    client: TestClient, dataset: dict, settings: Settings
) -> None:
    settings.multi_host = True
    r = client.post(API, json={"dataset_id": dataset["id"], "epochs": 1, "weights": "imagenet", "model": "resnet18"})
    assert r.status_code == 202, r.text
    assert r.json()["message"] == "waiting for a worker that holds the ImageNet weights of resnet18"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"FINETUNE_QUEUE_BACKEND": "redis", "FINETUNE_QUEUE_URL": "redis://127.0.0.1:6379/0"},
            "the database is SQLite",
        ),
        ({"FINETUNE_MULTI_HOST": "true"}, "the queue is SQLite"),
    ],
    ids=["shared-queue-sqlite-db", "explicit"],
)
@pytest.mark.parametrize("command", ["worker", "serve", "migrate"])
def test_a_multi_host_configuration_on_sqlite_is_refused_at_start(
    tmp_path: Path, env: dict[str, str], says: str, command: str
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", command],
        env={**base, "FINETUNE_DATA_DIR": str(tmp_path / "data"), **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "multi-host configuration" in r.stderr and says in r.stderr and "FINETUNE_MULTI_HOST=false" in r.stderr
    assert not (tmp_path / "data" / "service.db").exists()  # refused before anything was written


def test_multi_host_defaults(tmp_path: Path) -> None:
    one = Settings(data_dir=tmp_path / "d")
    assert not one.is_multi_host and one.cache_dir == tmp_path / "d" / "cache"
    several = Settings(
        data_dir=tmp_path / "d", queue_backend="redis", queue_url="redis://x", database_url="postgresql+psycopg://h/db"
    )
    assert several.is_multi_host and several.deployment_problem() is None
    assert several.cache_dir == Path.home() / ".cache" / "finetune-service"  # per host, never the shared folder
    assert (
        Settings(data_dir=tmp_path / "d", local_cache_dir=tmp_path / "c", multi_host=True).cache_dir == tmp_path / "c"
    )
    assert Settings(data_dir=tmp_path / "d", queue_backend="redis", multi_host=False).deployment_problem() is None


@sqlite_only
def test_run_files_name_no_absolute_path_and_resume_where_the_folder_moved(
    client: TestClient, dataset: dict, settings: Settings, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """run.json and the checkpoints' metadata hold paths relative to the data folder, so a run resumes with
    the data folder at another path (another host's mount point)."""
    first = start_worker()
    job = create(client, dataset, epochs=LONG)
    wait_for_checkpoint(client, settings, job["id"])
    assert client.post(f"{API}/{job['id']}/cancel").status_code == 200
    wait_for_job(client, job["id"], FINISHED, timeout=30)
    wait_gone(job["id"])
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=30)
    info = json.loads((run_dir(settings, job["id"]) / "run.json").read_text())
    assert info["config"]["data"] == f"datasets/{dataset['id']}/images"
    assert info["config"]["out"] == f"runs/{job['id']}"
    assert str(settings.data_dir) not in (run_dir(settings, job["id"]) / "run.json").read_text()
    checkpoint = last_checkpoint_epoch(settings, job["id"])
    assert checkpoint is not None

    moved = settings.data_dir.parent / "mounted-elsewhere"
    settings.data_dir.rename(moved)
    settings.data_dir = moved
    start_worker()
    assert client.post(f"{API}/{job['id']}/resume").status_code == 202
    done = wait_for_job(client, job["id"], FINISHED)
    assert_continued_from_checkpoint(settings, done, checkpoint, LONG)
