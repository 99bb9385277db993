"""Fields a client must not set: a job request's server-owned fields (owner, status, paths, device...) are
dropped and the job is created normally, owned by the caller and queued; any other unknown field is still a
422. An upload's form fields other than name/archive/files/paths are ignored (text) or refused (files)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.db import session_scope
from app.db.tables import Dataset, Job
from app.services.jobs import CLIENT_IGNORED, JobCreate
from app.settings import Settings
from app.storage import Storage
from tests.app.conftest import (
    assert_error,
    count_rows,
    dataset_files,
    make_account,
    sqlite_only,
    stored_files,
    upload_zip,
    user_id_of,
    zip_bytes,
)

TINY = {"model": "lenet", "weights": "none", "epochs": 2}
SNEAKY: dict[str, Any] = {
    "owner": "someone-else",
    "owner_id": "someone-else",
    "status": "succeeded",
    "run_key": "../../../etc",
    "id": "0123456789abcdef0123456789abcdef",
    "attempt": 99,
    "path": "/etc/passwd",
    "data": "/etc",
    "out": "/tmp/elsewhere",
    "cache_dir": "/tmp/cache",
    "cache_max_bytes": 1,
    "split_file": "/etc/passwd",
    "weights_dir": "/tmp/weights",
    "device": "cuda:7",
}


def test_the_ignored_fields_are_the_documented_ones() -> None:
    assert set(SNEAKY) == CLIENT_IGNORED


@pytest.fixture
def dataset(client: TestClient) -> dict:
    return upload_zip(client, dataset_files(per_class=4))


def test_server_owned_job_fields_are_ignored(client: TestClient, dataset: dict, settings: Settings) -> None:
    other = make_account(settings, "other")
    r = client.post("/api/v1/jobs", json={"dataset_id": dataset["id"], **TINY, **SNEAKY, "owner_id": other.user_id})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["attempt"] == 0
    assert job["id"] != SNEAKY["id"] and job["dataset_id"] == dataset["id"]
    assert job["config"]["epochs"] == 2 and not set(SNEAKY) & set(job["config"])
    with session_scope(settings.db_url) as s:
        row = s.get(Job, job["id"])
        assert row is not None
        assert row.owner_id == user_id_of(client)
        assert row.run_key == Storage.run_key(row.id)
        assert s.get(Job, SNEAKY["id"]) is None
    assert client.app.state.queue.depth() == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(CLIENT_IGNORED))
def test_each_ignored_field_alone(name: str) -> None:
    body = JobCreate.model_validate({"dataset_id": "d", name: SNEAKY[name]})
    assert body.model_dump()["dataset_id"] == "d" and name not in body.model_dump()


@pytest.mark.parametrize("field", ["epoch", "learning_rate", "owner_name", "Status", "extra"])
def test_other_unknown_fields_are_still_422(client: TestClient, dataset: dict, settings: Settings, field: str) -> None:
    r = client.post("/api/v1/jobs", json={"dataset_id": dataset["id"], **TINY, field: 1})
    error = assert_error(r, 422, "invalid")
    assert field in error["message"]
    assert count_rows(settings, "jobs") == 0


def test_a_job_request_that_is_not_an_object_is_422(client: TestClient) -> None:
    for body in ([], "x", 3, None):
        assert_error(client.post("/api/v1/jobs", json=body), 422, "invalid")


@sqlite_only
def test_upload_text_fields_other_than_name_and_paths_are_ignored(client: TestClient, settings: Settings) -> None:
    extra = {"owner_id": "someone-else", "id": "fixed", "source": "evil", "storage_key": "../x", "report": "{}"}
    r = client.post(
        "/api/v1/datasets",
        files={"archive": ("d.zip", zip_bytes(dataset_files(per_class=4)))},
        data={"name": "mine", **extra},
    )
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["name"] == "mine" and out["source"] == "zip" and out["id"] != "fixed"
    with session_scope(settings.db_url) as s:
        row = s.get(Dataset, out["id"])
        assert row is not None and row.owner_id == user_id_of(client)
        assert row.storage_key == Storage.dataset_key(row.id)
    # a raw zip body: only ?name= is read
    r = client.post(
        "/api/v1/datasets",
        content=zip_bytes(dataset_files(per_class=4)),
        headers={"content-type": "application/zip"},
        params={"name": "raw", **extra},
    )
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "raw" and r.json()["id"] != "fixed"


@sqlite_only
def test_upload_file_fields_other_than_archive_and_files_are_refused(client: TestClient, settings: Settings) -> None:
    archive = zip_bytes(dataset_files(per_class=4))
    for field in ("report", "owner_id", "images"):
        r = client.post("/api/v1/datasets", files={"archive": ("d.zip", archive), field: ("x.json", b"{}")})
        error = assert_error(r, 400, "bad_field")
        assert field in error["message"]
    assert count_rows(settings, "datasets") == 0
    assert stored_files(settings) == []
