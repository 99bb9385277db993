"""A job on several devices: asked for with ``devices``, refused when no worker has that many, and run end
to end by a real worker as two gloo processes under torchrun on the CPU (``FINETUNE_CPU_DEVICES``, default 2).

The end-to-end test runs on SQLite only (see ``sqlite_only``), like the other worker tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import session_scope
from app.db.tables import Worker
from app.jobs import state
from app.settings import Settings
from tests.app.conftest import (
    assert_error,
    dataset_files,
    job_processes,
    sqlite_only,
    upload_zip,
    wait_for_job,
    wait_until,
)
from tests.app.test_jobs_lifecycle import wait_for_checkpoint

API = "/api/v1/jobs"
TWO = {"model": "lenet", "weights": "none", "strategy": "full", "image_size": 32, "batch_size": 4, "devices": 2}


@sqlite_only
def test_a_two_device_job_runs_end_to_end_on_the_cpu_and_its_page_shows_it(
    client: TestClient, settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    dataset = upload_zip(client, dataset_files(per_class=10))
    r = client.post(API, json={"dataset_id": dataset["id"], **TWO, "epochs": 2})
    assert r.status_code == 202, r.text
    job = wait_for_job(client, r.json()["id"], ("succeeded", "failed", "cancelled"), timeout=180)
    assert job["status"] == "succeeded", job
    assert job["config"]["devices"] == 2 and job["model_id"]
    assert [m["epoch"] for m in job["metrics"]] == [1, 2]  # one row per epoch: rank 0 alone reports
    info = json.loads((settings.data_dir / "runs" / job["id"] / "run.json").read_text())
    assert info["training"]["devices"] == 2 and info["training"]["backend"] == "gloo"
    assert info["training"]["global_batch"] == 8
    html = client.get(f"/jobs/{job['id']}").text
    assert 'id="job-devices">2 · global batch 8<' in html
    log = (settings.data_dir / "logs" / f"job-{job['id']}-1.log").read_text()
    assert "rank 1 of 2 (gloo" in log  # the second process trained too


def test_more_devices_than_any_worker_has_is_refused_with_the_reason(
    client: TestClient, settings: Settings, tmp_path_factory: object
) -> None:
    dataset = upload_zip(client, dataset_files(per_class=6))
    # No live worker, one host: what a worker here would offer (no GPU here: FINETUNE_CPU_DEVICES = 2).
    error = assert_error(client.post(API, json={"dataset_id": dataset["id"], **TWO, "devices": 3}), 422)
    assert error["code"] == "too_many_devices" and "devices=3" in error["message"] and "at most 2" in error["message"]
    # Live workers: the biggest decides (one advertises four cards).
    with session_scope(settings.db_url) as s:
        for worker_id, devices in (("a" * 32, ["0"]), ("b" * 32, ["0", "1", "2", "3"])):
            state.register_worker(
                s, 60, id=worker_id, host=f"gpu-{worker_id[0]}", pid=1, slots=1, devices=devices, weights=[],
                draining=False,
            )  # fmt: skip
    assert client.post(API, json={"dataset_id": dataset["id"], **TWO, "devices": 4}).status_code == 202
    error = assert_error(client.post(API, json={"dataset_id": dataset["id"], **TWO, "devices": 5}), 422)
    assert "gpu-a: 1, gpu-b: 4" in error["message"]
    with session_scope(settings.db_url) as s:
        s.execute(update(Worker).values(stopped_at=state.db_now()))


def test_sync_batchnorm_needs_a_worker_with_that_many_gpus(client: TestClient, settings: Settings) -> None:
    dataset = upload_zip(client, dataset_files(per_class=6))
    body = {"dataset_id": dataset["id"], **TWO, "sync_batchnorm": True}
    # This host has no GPU: its two gloo processes run the job without it, not with it.
    error = assert_error(client.post(API, json=body), 422, "too_many_devices")
    assert "GPUs only" in error["message"] and "this host: 0" in error["message"]
    assert client.post(API, json={**body, "sync_batchnorm": False}).status_code == 202
    error = assert_error(client.post(API, json={**body, "devices": 1}), 422, "bad_config")
    assert "with devices > 1" in error["message"]
    with session_scope(settings.db_url) as s:
        for worker_id, devices in (("c" * 32, ["cpu:0", "cpu:1", "cpu:2"]), ("d" * 32, ["0", "1"])):
            state.register_worker(
                s, 60, id=worker_id, host=f"host-{worker_id[0]}", pid=1, slots=1, devices=devices, weights=[],
                draining=False,
            )  # fmt: skip
    assert client.post(API, json=body).status_code == 202  # host-d has two cards
    error = assert_error(client.post(API, json={**body, "devices": 3}), 422, "too_many_devices")
    assert "host-c: 0, host-d: 2" in error["message"]
    with session_scope(settings.db_url) as s:
        s.execute(update(Worker).values(stopped_at=state.db_now()))


def test_the_job_form_asks_for_devices(client: TestClient) -> None:
    dataset = upload_zip(client, dataset_files(per_class=6))
    html = client.get(f"/jobs/new?dataset={dataset['id']}").text
    assert 'name="devices"' in html and "Devices (GPUs)" in html


def test_cached_feature_strategies_stay_on_one_device(client: TestClient) -> None:
    dataset = upload_zip(client, dataset_files(per_class=6))
    for strategy in ("frozen", "two-stage"):
        body = {"dataset_id": dataset["id"], **TWO, "strategy": strategy}
        error = assert_error(client.post(API, json=body), 422, "bad_config")
        assert "strategy full" in error["message"]


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.slow
@sqlite_only
def test_a_killed_rank_has_the_whole_job_retried_from_its_checkpoint(
    client: TestClient, settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    """Rank 1 dies as under the OOM killer: rank 0 records nothing (it only lost a peer), the job's launcher
    ends by the same signal, and the worker retries the job from its last checkpoint, as for one process."""
    dataset = upload_zip(client, dataset_files(per_class=10))
    r = client.post(API, json={"dataset_id": dataset["id"], **TWO, "epochs": 12})
    job = r.json()
    checkpoint = wait_for_checkpoint(client, settings, job["id"])
    (pid,) = wait_until(lambda: [p for p in job_processes(job["id"]) if _rank_of(p) == "1"], 30, "rank 1")
    os.kill(pid, signal.SIGKILL)
    done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=240)
    assert done["status"] == "succeeded" and done["attempt"] == 2 and done["retries"] == 1, done
    assert "killed by the system" in done["retry_reason"]  # SIGKILL, as a killed single process
    assert [m["epoch"] for m in done["metrics"]] == list(range(1, 13))
    assert {m["attempt"] for m in done["metrics"] if m["epoch"] <= checkpoint} == {1}
