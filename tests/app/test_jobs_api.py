"""/api/v1/jobs over HTTP on SQLite and PostgreSQL, without a worker: validation, queueing, listing,
cancelling, resuming, deleting and the event stream of a job that is not running."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import session_scope
from app.db.tables import Job
from app.jobs.child import JobReporter
from app.jobs.worker import execute_job
from app.settings import Settings
from finetune.events import EpochEnd, RunStarted
from tests.app.conftest import (
    assert_error,
    count_rows,
    dataset_files,
    iter_events,
    metrics_held,
    read_events,
    upload_zip,
)

API = "/api/v1/jobs"
TINY = {"model": "lenet", "weights": "none", "epochs": 2}


@pytest.fixture
def dataset(client: TestClient) -> dict:
    return upload_zip(client, dataset_files(per_class=4))


def create(client: TestClient, dataset: dict, **overrides: object) -> dict:
    r = client.post(API, json={"dataset_id": dataset["id"], **TINY, **overrides})
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def set_status(settings: Settings, job_id: str, **values: object) -> None:
    """Put a job in a state only a worker reaches (there is none in these tests)."""
    with session_scope(settings.db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


# -- creating -----------------------------------------------------------------------------------------------


def test_create_is_202_and_queued(client: TestClient, dataset: dict, settings: Settings) -> None:
    job = create(client, dataset, epochs=3, batch_size=8, lr=0.01, image_size=24)
    assert job["status"] == "queued"
    assert job["dataset_id"] == dataset["id"]
    assert job["model"] == "lenet" and job["weights"] == "none"
    assert job["strategy"] == "full"  # auto without pretrained weights
    assert job["attempt"] == 0 and job["progress"] == 0.0
    assert job["started_at"] is None and job["finished_at"] is None and job["error"] is None
    config = job["config"]
    assert config["epochs"] == 3 and config["batch_size"] == 8 and config["lr"] == 0.01 and config["image_size"] == 24
    assert config["optimizer"] == "adamw"  # engine defaults fill the rest
    # the server decides where data, runs and caches live, and the device
    assert not {"data", "out", "cache_dir", "weights_dir", "device"} & set(config)
    assert client.get(f"{API}/{job['id']}").json()["status"] == "queued"
    # the queue heard of it
    assert client.app.state.queue.depth() == 1  # type: ignore[attr-defined]


def test_unknown_architecture_is_422(client: TestClient, dataset: dict, settings: Settings) -> None:
    error = assert_error(client.post(API, json={"dataset_id": dataset["id"], "model": "vgg99"}), 422, "invalid")
    assert "model" in error["message"]
    assert count_rows(settings, "jobs") == 0


OUT_OF_RANGE = [
    ("epochs", 0),
    ("epochs", 1001),
    ("batch_size", 0),
    ("lr", 100.0),
    ("momentum", 1.5),
    ("label_smoothing", 0.9),
    ("image_size", 8),
    ("val_fraction", 0.0),
    ("epochs", "many"),
    ("optimizer", "lbfgs"),
]

ENGINE_RULES = [
    ({"model": "lenet", "weights": "imagenet"}, "lenet has no ImageNet weights"),
    ({"model": "resnet18", "weights": "none", "image_size": 16}, "image_size must be at least 32"),
    ({"val_fraction": 0.5, "test_fraction": 0.45}, "val_fraction + test_fraction"),
    ({"batch_size": 4, "min_batch_size": 8}, "min_batch_size"),
]


def test_out_of_range_hyperparameter_is_422_naming_the_field(
    client: TestClient, dataset: dict, settings: Settings
) -> None:
    failures = []
    for field, value in OUT_OF_RANGE:
        try:
            r = client.post(API, json={"dataset_id": dataset["id"], **TINY, field: value})
            error = assert_error(r, 422, "invalid")
            assert field in error["message"], error
            assert [p["field"] for p in error["details"]] == [field], error
        except AssertionError as e:
            failures.append(f"{field}={value!r}: {e}")
    assert failures == []
    assert count_rows(settings, "jobs") == 0


def test_engine_rules_are_422_with_the_engine_message(client: TestClient, dataset: dict, settings: Settings) -> None:
    failures = []
    for overrides, words in ENGINE_RULES:
        try:
            r = client.post(API, json={"dataset_id": dataset["id"], **{**TINY, **overrides}})
            error = assert_error(r, 422, "bad_config")
            assert words in error["message"], error
        except AssertionError as e:
            failures.append(f"{overrides}: {e}")
    assert failures == []
    assert count_rows(settings, "jobs") == 0


def test_unknown_setting_is_refused(client: TestClient, dataset: dict) -> None:
    # Server-owned settings (device, data, out...) are dropped instead: test_ignored_fields.py.
    for field, value in [("colour", "red"), ("devices", "cuda"), ("outdir", "/tmp/x")]:
        error = assert_error(client.post(API, json={"dataset_id": dataset["id"], **TINY, field: value}), 422)
        assert field in error["message"]
    assert_error(client.post(API, json={**TINY}), 422, "invalid")  # no dataset_id
    assert_error(client.post(API, json={"dataset_id": dataset["id"], "weights": "/etc/passwd"}), 422, "invalid")


def test_imagenet_weights_not_on_the_server_is_422_weights_missing(
    client: TestClient, dataset: dict, settings: Settings
) -> None:
    assert settings.weights_dir is not None and not any(settings.weights_dir.glob("*"))
    r = client.post(API, json={"dataset_id": dataset["id"], "model": "resnet18", "weights": "imagenet"})
    error = assert_error(r, 422, "weights_missing")
    assert "finetune weights fetch" in error["message"]
    assert "resnet18" in error["message"]
    assert count_rows(settings, "jobs") == 0


def test_unknown_dataset_is_404(client: TestClient, settings: Settings) -> None:
    assert_error(client.post(API, json={"dataset_id": "nope", **TINY}), 404, "not_found")
    assert_error(client.post(API, json={"dataset_id": "a\x00b", **TINY}), 404, "not_found")
    assert count_rows(settings, "jobs") == 0


def test_wrong_content_type_is_an_error_in_the_one_shape(client: TestClient) -> None:
    assert_error(client.post(API, content=b"dataset_id=x", headers={"content-type": "text/plain"}), 422)
    assert_error(client.post(API, content=b"{not json", headers={"content-type": "application/json"}), 422)


# -- reading ----------------------------------------------------------------------------------------------


def test_list_with_status_filter_and_get(client: TestClient, dataset: dict) -> None:
    first = create(client, dataset)
    second = create(client, dataset)
    assert client.post(f"{API}/{first['id']}/cancel").status_code == 200
    assert [j["id"] for j in client.get(API).json()] == [second["id"], first["id"]]  # newest first
    assert [j["id"] for j in client.get(API, params={"status": "queued"}).json()] == [second["id"]]
    assert [j["id"] for j in client.get(API, params={"status": "cancelled"}).json()] == [first["id"]]
    assert client.get(API, params={"status": "running"}).json() == []
    assert_error(client.get(API, params={"status": "sleeping"}), 422, "invalid")

    got = client.get(f"{API}/{second['id']}").json()
    assert got["id"] == second["id"] and got["status"] == "queued"
    assert got["metrics"] == [] and got["model_id"] is None
    assert_error(client.get(f"{API}/nope"), 404, "not_found")
    for path in ("", "/events", "/cancel", "/resume"):  # PostgreSQL refuses NUL in a query parameter
        method = "GET" if path in ("", "/events") else "POST"
        assert_error(client.request(method, f"{API}/a%00b{path}"), 404, "not_found")


# -- cancel, resume, delete -----------------------------------------------------------------------------------


def test_cancel_a_queued_job_is_immediate_and_the_worker_skips_it(
    client: TestClient, dataset: dict, settings: Settings
) -> None:
    job = create(client, dataset)
    r = client.post(f"{API}/{job['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    assert client.get(f"{API}/{job['id']}").json()["status"] == "cancelled"
    assert_error(client.post(f"{API}/{job['id']}/cancel"), 409, "not_cancellable")

    # the queue message is still there; the worker's task body drops it without running anything
    execute_job(settings, job["id"])
    after = client.get(f"{API}/{job['id']}").json()
    assert after["status"] == "cancelled" and after["attempt"] == 0 and after["started_at"] is None
    assert not (settings.data_dir / "logs").exists() and not (settings.data_dir / "runs").exists()


def test_cancel_a_running_job_asks_the_worker(client: TestClient, dataset: dict, settings: Settings) -> None:
    job = create(client, dataset)
    set_status(settings, job["id"], status="running", attempt=1)
    r = client.post(f"{API}/{job['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    assert client.get(f"{API}/{job['id']}").json()["cancel_requested"] is True


def test_delete_is_refused_while_active(client: TestClient, dataset: dict, settings: Settings) -> None:
    job = create(client, dataset)
    assert_error(client.delete(f"{API}/{job['id']}"), 409, "job_active")
    set_status(settings, job["id"], status="running", attempt=1)
    assert_error(client.delete(f"{API}/{job['id']}"), 409, "job_active")
    set_status(settings, job["id"], status="failed")
    run_dir = settings.data_dir / "runs" / job["id"]
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    r = client.delete(f"{API}/{job['id']}")
    assert r.status_code == 204 and r.content == b""
    assert_error(client.get(f"{API}/{job['id']}"), 404, "not_found")
    assert not run_dir.exists()  # no model uses the files: they go with the job
    assert_error(client.delete(f"{API}/{job['id']}"), 404, "not_found")


def test_resume(client: TestClient, dataset: dict, settings: Settings) -> None:
    job = create(client, dataset)
    assert_error(client.post(f"{API}/{job['id']}/resume"), 409, "not_resumable")
    set_status(settings, job["id"], status="succeeded")
    assert_error(client.post(f"{API}/{job['id']}/resume"), 409, "not_resumable")

    set_status(settings, job["id"], status="failed", error="boom", error_code="training_failed")
    r = client.post(f"{API}/{job['id']}/resume")
    assert r.status_code == 202, r.text
    resumed = r.json()
    assert resumed["status"] == "queued" and resumed["error"] is None and resumed["error_code"] is None
    assert resumed["finished_at"] is None

    # a job whose dataset is gone keeps its history but cannot run again
    client.post(f"{API}/{job['id']}/cancel")
    assert client.delete(f"/api/v1/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"{API}/{job['id']}").json()["dataset_id"] is None
    assert_error(client.post(f"{API}/{job['id']}/resume"), 409, "dataset_deleted")
    assert_error(client.post(f"{API}/nope/resume"), 404, "not_found")


# -- events ---------------------------------------------------------------------------------------------------


def test_events_of_a_finished_job(client: TestClient, dataset: dict) -> None:
    job = create(client, dataset)
    client.post(f"{API}/{job['id']}/cancel")
    events = read_events(client, job["id"], timeout=20)
    assert [e for e, _ in events] == ["reset", "job", "end"]
    assert events[0][1] == {"attempt": 0, "metrics": []}
    assert events[1][1]["id"] == job["id"] and events[1][1]["status"] == "cancelled"
    assert events[2][1] == {"id": job["id"], "status": "cancelled"}
    assert_error(client.get(f"{API}/nope/events"), 404, "not_found")


def read_until(events: Iterator[tuple[str, dict[str, Any]]], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """The events up to and with the next one of ``kind`` (``job`` events may come between)."""
    read = [next(events)]
    while read[-1][0] != kind:
        read.append(next(events))
    return read


def epoch_end(epoch: int, val_acc: float) -> EpochEnd:
    return EpochEnd(epoch, 3, "finetune", 1.0 / epoch, val_acc, 1.0 / epoch, val_acc, 1e-3, 100.0, 1.0, 1.0, 2.0, True)


def test_the_event_stream_replaces_the_epochs_a_resumed_attempt_dropped(
    client: TestClient, dataset: dict, settings: Settings
) -> None:
    """Attempt 1 trained epochs 1-3 and died with its last checkpoint at epoch 1; attempt 2 resumes from it.
    A client watching throughout is told to drop attempt 1's epochs 2-3 (a ``reset`` with the history that
    remains), then gets attempt 2's epochs: what it ends up holding is exactly the job's history."""
    job = create(client, dataset, epochs=3)
    set_status(settings, job["id"], status="running", attempt=1)
    first = JobReporter(settings, job["id"], 1)  # what the job processes write, as they write it
    for epoch in (1, 2, 3):
        first(epoch_end(epoch, val_acc=0.1))

    with client.stream("GET", f"{API}/{job['id']}/events") as r:
        events = iter_events(r)
        seen = [next(events), next(events)]
        assert [kind for kind, _ in seen] == ["reset", "job"]
        assert [(m["epoch"], m["attempt"]) for m in seen[0][1]["metrics"]] == [(1, 1), (2, 1), (3, 1)]

        set_status(settings, job["id"], attempt=2)  # claimed again; its process resumes from epoch 1
        second = JobReporter(settings, job["id"], 2)
        second(RunStarted("run", "lenet", "full", 3, 9, 3, 0, 3, "cpu", resumed_from_epoch=1))
        seen += read_until(events, "reset")
        assert seen[-1] == ("reset", {"attempt": 2, "metrics": seen[0][1]["metrics"][:1]})

        second(epoch_end(2, val_acc=0.9))
        seen += read_until(events, "metric")
        assert (seen[-1][1]["epoch"], seen[-1][1]["attempt"]) == (2, 2)
        second(epoch_end(3, val_acc=0.9))
        set_status(settings, job["id"], status="succeeded")
        seen += list(events)
    assert seen[-1] == ("end", {"id": job["id"], "status": "succeeded"})
    assert metrics_held(seen) == client.get(f"{API}/{job['id']}").json()["metrics"]
    assert [(m["epoch"], m["attempt"], m["val_acc"]) for m in metrics_held(seen)] == [
        (1, 1, 0.1),
        (2, 2, 0.9),
        (3, 2, 0.9),
    ]


def test_open_event_streams_do_not_hold_database_connections(client: TestClient, dataset: dict) -> None:
    """Many people watching jobs must not starve the API of database connections (pool: 5 + 10)."""
    job = create(client, dataset)  # stays queued: its stream never ends
    with contextlib.ExitStack() as streams:
        for _ in range(20):
            r = streams.enter_context(client.stream("GET", f"{API}/{job['id']}/events"))
            assert r.status_code == 200
        started = time.monotonic()
        assert client.get(f"{API}/{job['id']}").json()["status"] == "queued"
        assert client.post(f"{API}/{job['id']}/cancel").status_code == 200
        assert time.monotonic() - started < 10
