"""Uploads checked in the background: the row shows the check's progress, a refusal leaves its reason and
nothing else, an interrupted check is given up, and at scale (5,000 images) the whole path, a job under
``ulimit -n 256`` included, goes through."""

from __future__ import annotations

import io
import resource
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.db import session_scope
from app.services import datasets as svc
from app.services.auth import user_for_key
from app.settings import Settings
from tests.app.conftest import (
    assert_error,
    count_rows,
    dataset_files,
    sqlite_only,
    wait_for_job,
    wait_until,
    zip_bytes,
)
from tests.finetune.test_scale import tiny_greyscale_folder

API = "/api/v1/datasets"
ASYNC = {"Prefer": "respond-async"}


def folder_zip(root: Path) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(root.rglob("*.png")):
            zf.write(path, path.relative_to(root).as_posix())
    return out.getvalue()


def wait_until_checked(client: TestClient, dataset_id: str, timeout: float = 300) -> tuple[dict, list[dict]]:
    """Poll the dataset until its check ends: (the dataset, every distinct progress seen on the way)."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"{API}/{dataset_id}").json()
        if body["status"] != "checking":
            return body, seen
        if body["progress"] and (not seen or seen[-1] != body["progress"]):
            seen.append(body["progress"])
        time.sleep(0.05)
    raise AssertionError(f"dataset {dataset_id} was still being checked after {timeout}s")


def data_files(settings: Settings) -> list[str]:
    return sorted(str(p.relative_to(settings.data_dir)) for p in settings.data_dir.rglob("*") if p.is_file())


def test_an_async_upload_answers_at_once_and_shows_its_check(client: TestClient) -> None:
    r = client.post(API, files={"archive": ("d.zip", zip_bytes(dataset_files()))}, data={"name": "d"}, headers=ASYNC)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "checking" and body["progress"]["phase"] in ("queued", "extracting", "checking")
    assert r.headers["location"] == f"{API}/{body['id']}"
    ready, _ = wait_until_checked(client, body["id"])
    assert ready["status"] == "ready" and ready["num_images"] == 36 and ready["error"] is None
    assert ready["progress"] is None and sum(len(u) for u in ready["thumbnails"].values()) == 12
    # Ready means stored: a job started now reads these pixels instead of decoding the images again.
    assert client.get("/readyz").json()["pixel_store"]["entries"] == 36
    assert any(d["id"] == body["id"] and d["status"] == "ready" for d in client.get(API).json())


def test_a_refused_async_upload_keeps_only_its_reason(client: TestClient, settings: Settings) -> None:
    before = data_files(settings)
    one_class = {k: v for k, v in dataset_files().items() if k.startswith("red/")}
    r = client.post(API, files={"archive": ("d.zip", zip_bytes(one_class))}, headers=ASYNC)
    assert r.status_code == 202, r.text
    refused, _ = wait_until_checked(client, r.json()["id"])
    assert refused["status"] == "refused"
    assert refused["error"]["code"] == "bad_dataset" and "at least 2 classes" in refused["error"]["message"]
    assert refused["num_images"] == 0 and refused["thumbnails"] is None
    assert data_files(settings) == before  # no file anywhere under the data folder, pixel store included
    assert client.app.state.pixel_store.usage()["entries"] == 0  # type: ignore[attr-defined]
    # It cannot be trained on, has no files to list, and can be deleted.
    error = assert_error(
        client.post("/api/v1/jobs", json={"dataset_id": refused["id"], "model": "lenet", "weights": "none"}), 409
    )
    assert error["code"] == "dataset_not_ready" and "refused" in error["message"]
    assert_error(client.get(f"{API}/{refused['id']}/files"), 409, "dataset_not_ready")
    assert client.delete(f"{API}/{refused['id']}").status_code == 204


def test_a_refused_upload_that_waits_leaves_no_row(client: TestClient, settings: Settings) -> None:
    rows = count_rows(settings, "datasets")
    one_class = {k: v for k, v in dataset_files().items() if k.startswith("red/")}
    error = assert_error(client.post(API, files={"archive": ("d.zip", zip_bytes(one_class))}), 422, "bad_dataset")
    assert "at least 2 classes" in error["message"]
    assert count_rows(settings, "datasets") == rows


def test_a_check_whose_service_died_is_given_up(client: TestClient, settings: Settings) -> None:
    key = client.headers["authorization"].split(" ", 1)[1]
    with session_scope(settings.db_url) as s:
        found = user_for_key(s, key)
        assert found is not None
        # As a check left behind by a process that died: its lease ran out a minute ago.
        dataset_id = svc.create_pending(s, found[0], "lost", "zip", lease_seconds=-60).id
    body = client.get(f"{API}/{dataset_id}").json()
    assert body["status"] == "refused" and body["error"]["code"] == "interrupted"
    assert "upload it again" in body["error"]["message"]


def test_a_dataset_being_checked_cannot_be_trained_on_or_deleted(client: TestClient, settings: Settings) -> None:
    key = client.headers["authorization"].split(" ", 1)[1]
    with session_scope(settings.db_url) as s:
        found = user_for_key(s, key)
        assert found is not None
        dataset_id = svc.create_pending(s, found[0], "busy", "zip", lease_seconds=600).id
    job = client.post("/api/v1/jobs", json={"dataset_id": dataset_id, "model": "lenet", "weights": "none"})
    assert "still being checked" in assert_error(job, 409, "dataset_not_ready")["message"]
    assert_error(client.delete(f"{API}/{dataset_id}"), 409, "in_use")


def test_the_check_reports_each_phase(tmp_path: Path, settings: Settings, client: TestClient) -> None:
    from app.services.uploads import from_archive

    archive = tmp_path / "up" / "upload.zip"
    archive.parent.mkdir()
    archive.write_bytes(zip_bytes(dataset_files(per_class=100)))
    phases: list[tuple[str, int, int]] = []
    checked = svc.check_upload(
        from_archive("d", archive),
        archive.parent,
        settings,
        client.app.state.pixel_store,  # type: ignore[attr-defined]
        progress=lambda *p: phases.append(p),
    )
    checked.drop_pixels()
    names = [p[0] for p in phases]
    assert names == sorted(names, key=["extracting", "checking", "storing"].index)  # in order
    assert ("extracting", 300, 300) in phases and ("checking", 300, 300) in phases and names[-1] == "storing"
    checking = [done for phase, done, _ in phases if phase == "checking"]
    assert checking == sorted(checking) and len(checking) > 2


# -- at scale -----------------------------------------------------------------------------------------------

OPEN_FILES = 256


def _open_files_limit(pid: int) -> int | None:
    """The soft open-file limit of a process once it runs the worker (after its exec), from /proc."""
    try:
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] != [b"-m", b"app.cli"]:
            return None  # not exec'd yet (the -c script that sets the limit mentions app.cli too)
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    except OSError:
        return None
    return None


@sqlite_only
def test_5000_images_uploaded_checked_and_trained_under_256_open_files(
    client: TestClient, settings: Settings, tmp_path: Path, start_worker: Callable[..., Any]
) -> None:
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= OPEN_FILES
    data = folder_zip(tiny_greyscale_folder(tmp_path / "digits", 5000))
    r = client.post(API, files={"archive": ("digits.zip", data)}, data={"name": "digits"}, headers=ASYNC)
    assert r.status_code == 202, r.text
    dataset, seen = wait_until_checked(client, r.json()["id"])
    assert dataset["status"] == "ready", dataset
    assert dataset["num_images"] == 5000 and dataset["num_classes"] == 10
    # The check was visible while it ran: how far it had got, a few times a second.
    assert any(p["phase"] in ("extracting", "checking") and 0 < p["done"] < p["total"] for p in seen), seen
    # The report stays readable: counts and samples on the row, the files a page at a time.
    assert "files" not in dataset["report"] and len(dataset["report"]["samples"]) == 10
    page = client.get(f"{API}/{dataset['id']}/files", params={"offset": 100, "limit": 50}).json()
    assert page["total"] == 5000 and len(page["files"]) == 50 and page["files"][0]["index"] == 100
    val3 = client.get(f"{API}/{dataset['id']}/files", params={"class": "class3", "split": "val"}).json()
    assert val3["total"] == dataset["report"]["counts"]["class3"]["val"]
    assert all(f["class"] == "class3" and f["split"] == "val" for f in val3["files"])
    streamed = client.get(f"{API}/{dataset['id']}/report").json()
    assert len(streamed["files"]) == 5000 and streamed["num_images"] == 5000
    # The check's pixels were kept: a few KB each, whatever the tier.
    usage = client.app.state.pixel_store.usage()  # type: ignore[attr-defined]
    assert usage["entries"] == 5000 and usage["used_bytes"] / 5000 <= 4096

    worker = start_worker(open_files=OPEN_FILES)
    limits = wait_until(lambda: _open_files_limit(worker.pid), 30, "the worker to start")
    assert limits == OPEN_FILES  # and its job processes inherit it
    job = client.post(
        "/api/v1/jobs",
        json={"dataset_id": dataset["id"], "model": "lenet", "weights": "none", "epochs": 1, "batch_size": 64},
    )
    assert job.status_code == 202, job.text
    done = wait_for_job(client, job.json()["id"], ("succeeded", "failed"), timeout=600)
    assert done["status"] == "succeeded", done
