"""/api/v1/datasets over HTTP on SQLite and PostgreSQL: the three ways to upload, the report, thumbnails,
list/get/delete, and every bad input answered with a 4xx in the one error shape and nothing stored."""

from __future__ import annotations

import io
import stat
import zipfile
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update

from app.db import session_scope
from app.db.tables import Job
from app.settings import Settings
from tests.app.conftest import (
    assert_error,
    count_rows,
    dataset_files,
    stored_files,
    upload_zip,
    zip_bytes,
)

API = "/api/v1/datasets"
JOB = {"model": "lenet", "weights": "none", "epochs": 2}


def files_form(files: dict[str, bytes], paths: list[str] | None = None) -> dict[str, Any]:
    """The multipart form a folder picker sends: one ``files`` part per file, ``paths`` alongside."""
    parts = [("files", (rel.rsplit("/", 1)[-1], data, "image/png")) for rel, data in files.items()]
    return {"files": parts, "data": {"paths": paths if paths is not None else list(files)}}


def assert_nothing_stored(client: TestClient, settings: Settings) -> None:
    assert client.get(API).json() == []
    assert count_rows(settings, "datasets") == 0
    assert stored_files(settings) == []


def with_extras() -> dict[str, bytes]:
    """Three classes plus a duplicate, a non-image, a file outside any class and OS junk."""
    files = dataset_files(per_class=8)
    files["red/copy-of-0.png"] = files["red/0.png"]
    files["green/notes.txt"] = b"not a picture"
    files["readme.txt"] = b"loose file at the top"
    files["__MACOSX/red/._0.png"] = b"resource fork"
    files["blue/.DS_Store"] = b"junk"
    return files


# -- creating -------------------------------------------------------------------------------------------


def test_create_from_zip_reports_classes_splits_skips_and_duplicates(client: TestClient, settings: Settings) -> None:
    r = client.post(API, files={"archive": ("shapes.zip", zip_bytes(with_extras()))}, data={"name": "shapes"})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["name"] == "shapes"
    assert ds["source"] == "zip"
    assert ds["classes"] == ["blue", "green", "red"]
    assert ds["num_classes"] == 3
    assert ds["num_images"] == 25  # 3 x 8 + the duplicate; the junk is ignored, the rest skipped
    report = ds["report"]
    assert "files" not in report  # the per-file list is only in the full report
    assert set(report["counts"]) == {"blue", "green", "red"}
    assert sum(sum(c.values()) for c in report["counts"].values()) == 25
    assert report["counts"]["red"]["train"] + report["counts"]["red"]["val"] + report["counts"]["red"]["test"] == 9
    assert all(c["val"] >= 1 and c["train"] >= 1 for c in report["counts"].values())
    assert report["split_totals"]["train"] + report["split_totals"]["val"] + report["split_totals"]["test"] == 25
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"green/notes.txt", "readme.txt"}
    assert "not an image" in skipped["green/notes.txt"]
    assert "not inside a class folder" in skipped["readme.txt"]
    assert report["duplicates"] == [["red/0.png", "red/copy-of-0.png"]]
    codes = {w["code"] for w in report["warnings"]}
    assert {"duplicates", "skipped_files", "small_class"} <= codes
    assert report["root"] == "."
    assert "/" not in report["root"] and str(settings.data_dir) not in r.text  # no server paths leak
    # the images are in place under the dataset's own folder, under generated names (the report maps them)
    images = settings.data_dir / "datasets" / ds["id"] / "images"
    files = {f["path"]: f for f in client.get(f"{API}/{ds['id']}/report").json()["files"]}
    copy = files["red/copy-of-0.png"]
    assert copy["class"] == "red" and copy["stored"].startswith("red/")
    assert (images / copy["stored"]).read_bytes() == with_extras()["red/copy-of-0.png"]
    assert not (images / "red" / "copy-of-0.png").exists()
    assert not (images / "__MACOSX").exists() and not (images / "blue" / ".DS_Store").exists()
    assert [p for p in stored_files(settings) if p.startswith("tmp")] == []
    assert count_rows(settings, "datasets") == 1


def test_create_from_files_with_relative_paths(client: TestClient, settings: Settings) -> None:
    files = dataset_files(per_class=5)
    form = files_form(files)
    form["data"]["name"] = "from a folder"
    r = client.post(API, **form)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["source"] == "files"
    assert ds["name"] == "from a folder"
    assert ds["classes"] == ["blue", "green", "red"]
    assert ds["num_images"] == 15
    assert ds["report"]["skipped"] == []
    report = client.get(f"{API}/{ds['id']}/report").json()
    assert {f["path"] for f in report["files"]} == set(files)
    for f in report["files"]:
        assert (settings.data_dir / "datasets" / ds["id"] / "images" / f["stored"]).read_bytes() == files[f["path"]]


def test_create_from_files_named_by_their_filenames(client: TestClient) -> None:
    """Without ``paths``, each part's filename is its relative path."""
    parts = [("files", (rel, data, "image/png")) for rel, data in dataset_files(per_class=4).items()]
    r = client.post(API, files=parts)
    assert r.status_code == 201, r.text
    assert r.json()["classes"] == ["blue", "green", "red"]
    assert r.json()["name"].startswith("dataset ")  # a default name


def test_create_from_raw_zip_body(client: TestClient) -> None:
    body = zip_bytes(dataset_files(per_class=4))
    r = client.post(API, content=body, headers={"content-type": "application/zip"}, params={"name": "raw"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "raw"
    assert r.json()["source"] == "zip"
    assert r.json()["num_images"] == 12


def test_zip_with_a_wrapper_folder(client: TestClient) -> None:
    files = {f"my photos/{rel}": data for rel, data in dataset_files(per_class=4).items()}
    ds = upload_zip(client, files)
    assert ds["classes"] == ["blue", "green", "red"]
    assert ds["report"]["root"] == "my photos"
    url = ds["thumbnails"]["red"][0]
    assert client.get(url).status_code == 200
    report = client.get(f"{API}/{ds['id']}/report").json()
    assert report["files"][0]["path"].split("/")[0] in ("blue", "green", "red")


def test_a_zip_of_only_a_train_folder_gets_val_and_test_split_from_it(client: TestClient) -> None:
    """It was read as one class named 'train' and refused ("found 1: ['train']")."""
    ds = upload_zip(client, {f"train/{rel}": data for rel, data in dataset_files(per_class=10).items()})
    assert ds["classes"] == ["blue", "green", "red"] and ds["report"]["root"] == "train"
    assert ds["report"]["split"] == "stratified"
    assert all(c == {"train": 8, "val": 1, "test": 1} for c in ds["report"]["counts"].values())
    report = client.get(f"{API}/{ds['id']}/report").json()
    assert {f["path"].split("/")[0] for f in report["files"]} == {"blue", "green", "red"}
    assert client.get(ds["thumbnails"]["red"][0]).status_code == 200


def test_explicit_split_and_unicode_class_names(client: TestClient) -> None:
    train = dataset_files(per_class=4, classes={"große Katze": (200, 40, 40), "chien noir": (20, 20, 20)})
    val = dataset_files(per_class=2, seed=5, classes={"große Katze": (200, 40, 40), "chien noir": (20, 20, 20)})
    files = {f"train/{k}": v for k, v in train.items()} | {f"val/{k}": v for k, v in val.items()}
    form = files_form(files, [k.replace("/", "\\") for k in files])  # as Windows would send them
    r = client.post(API, **form)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["classes"] == ["chien noir", "große Katze"]
    assert ds["report"]["split"] == "explicit"
    assert ds["report"]["counts"]["große Katze"] == {"train": 4, "val": 2, "test": 0}
    for urls in ds["thumbnails"].values():
        assert client.get(urls[0]).headers["content-type"] == "image/jpeg"
    paths = {f["path"] for f in client.get(f"{API}/{ds['id']}/report").json()["files"]}
    assert "train/große Katze/0.png" in paths and "val/chien noir/1.png" in paths


def test_names_lose_control_characters(client: TestClient) -> None:
    body = zip_bytes(dataset_files(per_class=3))
    r = client.post(API, **archive(body), data={"name": " cats\x00 and\ndogs\t"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "cats  and dogs"
    r = client.post(API, content=body, headers={"content-type": "application/zip"}, params={"name": "x" * 300})
    assert r.json()["name"] == "x" * 200
    r = client.post(API, content=body, headers={"content-type": "application/zip"}, params={"name": "\x00\x01"})
    assert r.json()["name"].startswith("dataset ")
    assert len(client.get(API).json()) == 3


# -- reading ----------------------------------------------------------------------------------------------


def test_list_get_report_and_thumbnails(client: TestClient) -> None:
    first = upload_zip(client, dataset_files(per_class=6), name="first")
    second = upload_zip(client, dataset_files(per_class=6, seed=1), name="second")
    listed = client.get(API).json()
    assert [d["name"] for d in listed] == ["second", "first"]  # newest first
    assert all(d["thumbnails"] is None for d in listed)

    got = client.get(f"{API}/{first['id']}").json()
    assert got["id"] == first["id"] and got["report"] == first["report"]
    assert set(got["thumbnails"]) == {"blue", "green", "red"}
    for urls in got["thumbnails"].values():
        assert 1 <= len(urls) <= 4
    for cls, urls in got["thumbnails"].items():
        r = client.get(urls[0])
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "JPEG" and max(img.size) <= 160
        # the thumbnail shows a file of that class
        index = int(urls[0].rsplit("/", 1)[1])
        report = client.get(f"{API}/{first['id']}/report").json()
        assert report["files"][index]["class"] == cls

    report = client.get(f"{API}/{second['id']}/report").json()
    assert len(report["files"]) == second["num_images"] == 18
    assert {f["split"] for f in report["files"]} == {"train", "val", "test"}
    assert {f["class"] for f in report["files"]} == {"blue", "green", "red"}
    assert report["counts"] == second["report"]["counts"]


def test_missing_datasets_and_thumbnails_are_404(client: TestClient) -> None:
    assert_error(client.get(f"{API}/nope"), 404, "not_found")
    assert_error(client.get(f"{API}/nope/report"), 404, "not_found")
    assert_error(client.get(f"{API}/nope/thumbnails/0"), 404, "not_found")
    assert_error(client.delete(f"{API}/nope"), 404, "not_found")
    assert_error(client.get(f"{API}/a%00b"), 404, "not_found")  # PostgreSQL refuses NUL in a parameter
    ds = upload_zip(client, dataset_files(per_class=3))
    assert_error(client.get(f"{API}/{ds['id']}/thumbnails/9"), 404, "not_found")
    assert_error(client.get(f"{API}/{ds['id']}/thumbnails/-1"), 404, "not_found")


# -- deleting ---------------------------------------------------------------------------------------------


def test_delete_removes_row_and_files(client: TestClient, settings: Settings) -> None:
    ds = upload_zip(client, dataset_files(per_class=3))
    folder = settings.data_dir / "datasets" / ds["id"]
    assert folder.is_dir()
    r = client.delete(f"{API}/{ds['id']}")
    assert r.status_code == 204 and r.content == b""
    assert_error(client.get(f"{API}/{ds['id']}"), 404, "not_found")
    assert not folder.exists()
    assert_nothing_stored(client, settings)


def test_delete_is_refused_while_a_job_uses_the_dataset(client: TestClient, settings: Settings) -> None:
    ds = upload_zip(client, dataset_files(per_class=3))
    job = client.post("/api/v1/jobs", json={"dataset_id": ds["id"], **JOB}).json()
    assert job["status"] == "queued"  # no worker runs here: it stays queued
    assert_error(client.delete(f"{API}/{ds['id']}"), 409, "in_use")

    with session_scope(settings.db_url) as s:  # as a worker would have it
        s.execute(update(Job).where(Job.id == job["id"]).values(status="running", attempt=1))
    assert_error(client.delete(f"{API}/{ds['id']}"), 409, "in_use")
    assert (settings.data_dir / "datasets" / ds["id"]).is_dir()

    with session_scope(settings.db_url) as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(status="failed"))
    assert client.delete(f"{API}/{ds['id']}").status_code == 204
    # the job's history stays, without its dataset
    assert client.get(f"/api/v1/jobs/{job['id']}").json()["dataset_id"] is None


# -- bad input: 4xx, one error shape, nothing stored ------------------------------------------------------


def corrupt_zip() -> bytes:
    """A zip whose directory is intact but whose compressed data is garbage."""
    data = bytearray(zip_bytes(dataset_files(per_class=3)))
    for i in range(100, 400):
        data[i] ^= 0x5A
    return bytes(data)


def zip_with_link() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in dataset_files(per_class=3).items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("red/link.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return out.getvalue()


def archive(data: bytes) -> dict[str, Any]:
    return {"files": {"archive": ("data.zip", data)}}


SMALL = dataset_files(per_class=3)
PATHS = list(SMALL)

BAD_UPLOADS: dict[str, tuple[Callable[[], dict[str, Any]], int, str, str]] = {
    # name: (request kwargs, status, code, a word of the message)
    "not a zip": (lambda: archive(b"this is not a zip file at all"), 422, "bad_dataset", "data.zip is not a valid zip"),
    "truncated zip": (lambda: archive(zip_bytes(SMALL)[:500]), 422, "bad_dataset", "not a valid zip"),
    "corrupt zip": (lambda: archive(corrupt_zip()), 422, "bad_dataset", "corrupt"),
    "empty zip": (lambda: archive(zip_bytes({})), 422, "bad_dataset", "empty"),
    "parent path in zip": (
        lambda: archive(zip_bytes({**SMALL, "../x.png": SMALL["red/0.png"]})),
        422,
        "unsafe_archive",
        "outside",
    ),
    "absolute path in zip": (
        lambda: archive(zip_bytes({**SMALL, "/tmp/x.png": SMALL["red/0.png"]})),
        422,
        "unsafe_archive",
        "absolute",
    ),
    "link in zip": (lambda: archive(zip_with_link()), 422, "unsafe_archive", "link"),
    "parent path in paths": (
        lambda: files_form(SMALL, [*PATHS[:-1], "../evil.png"]),
        400,
        "unsafe_path",
        "outside",
    ),
    "nested parent path in paths": (
        lambda: files_form(SMALL, ["red/../../evil.png", *PATHS[1:]]),
        400,
        "unsafe_path",
        "outside",
    ),
    "absolute path in paths": (
        lambda: files_form(SMALL, ["/etc/evil.png", *PATHS[1:]]),
        400,
        "unsafe_path",
        "absolute",
    ),
    "one class only": (
        lambda: archive(zip_bytes({k: v for k, v in SMALL.items() if k.startswith("red/")})),
        422,
        "bad_dataset",
        "at least 2 classes",
    ),
    "class without a usable image": (
        lambda: archive(zip_bytes({**SMALL, "grey/a.txt": b"text", "grey/b.jpg": b"\xff\xd8 truncated"})),
        422,
        "bad_dataset",
        "'grey' has no usable image",
    ),
    "no usable image at all": (
        lambda: archive(zip_bytes({"a/1.txt": b"x", "b/2.txt": b"y"})),
        422,
        "bad_dataset",
        "no usable image",
    ),
    "fewer paths than files": (lambda: files_form(SMALL, PATHS[:-1]), 400, "bad_field", "paths"),
    "the same path twice": (
        lambda: files_form(SMALL, [*PATHS[:-1], PATHS[0]]),
        400,
        "duplicate_path",
        "twice",
    ),
    "archive and files together": (
        lambda: {"files": [("archive", ("a.zip", zip_bytes(SMALL))), ("files", ("red/0.png", SMALL["red/0.png"]))]},
        400,
        "bad_field",
        "either",
    ),
    "an unknown file field": (lambda: {"files": {"upload": ("a.zip", zip_bytes(SMALL))}}, 400, "bad_field", "upload"),
    "a form without files": (lambda: {"files": {"name": (None, "x")}}, 400, "empty_upload", "no files"),
    "an empty zip body": (lambda: {"content": b"", "headers": {"content-type": "application/zip"}}, 400, "", "empty"),
    "json": (lambda: {"json": {"archive": "x"}}, 415, "unsupported_media_type", "multipart"),
    "plain text": (
        lambda: {"content": b"red/0.png", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        "multipart",
    ),
    "multipart without a boundary": (
        lambda: {"content": b"--x--", "headers": {"content-type": "multipart/form-data"}},
        400,
        "bad_multipart",
        "no boundary",
    ),
    "a malformed multipart body": (
        lambda: {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=abc"}},
        400,
        "",
        "",
    ),
}


def test_bad_uploads_are_4xx_and_store_nothing(client: TestClient, settings: Settings) -> None:
    """Every case in BAD_UPLOADS, one after another on the same service; all failures are reported."""
    failures = []
    for case, (make_request, status, code, words) in BAD_UPLOADS.items():
        try:
            error = assert_error(client.post(API, **make_request()), status, code or None)
            assert words.lower() in error["message"].lower(), error
            assert_nothing_stored(client, settings)
        except AssertionError as e:
            failures.append(f"{case}: {e}")
    assert failures == []


def test_too_large_upload_is_413_and_stores_nothing(client: TestClient, settings: Settings) -> None:
    body = zip_bytes(dataset_files(per_class=4))
    settings.max_upload_bytes = len(body) // 2
    # refused on the declared length ...
    assert_error(client.post(API, **archive(body)), 413, "too_large")
    assert_error(client.post(API, **files_form(dataset_files(per_class=4))), 413, "too_large")
    assert_error(client.post(API, content=body, headers={"content-type": "application/zip"}), 413, "too_large")
    # ... and, without one (chunked), while the bytes arrive
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    r = client.post(API, content=iter(chunks), headers={"content-type": "application/zip"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "too_large")
    assert_nothing_stored(client, settings)

    settings.max_upload_bytes = len(body) * 2  # the same upload fits a larger limit
    assert client.post(API, **archive(body)).status_code == 201


def test_too_many_files_is_413_and_stores_nothing(client: TestClient, settings: Settings) -> None:
    settings.max_upload_files = 5
    error = assert_error(client.post(API, **files_form(dataset_files(per_class=2))), 413, "too_many_files")
    assert "5" in error["message"]
    assert_nothing_stored(client, settings)
    # the limit counts files in a folder upload, not images inside one zip
    assert client.post(API, **archive(zip_bytes(dataset_files(per_class=2)))).status_code == 201


def test_a_failed_upload_does_not_disturb_stored_datasets(client: TestClient, settings: Settings) -> None:
    kept = upload_zip(client, dataset_files(per_class=3))
    before = stored_files(settings)
    assert_error(client.post(API, **archive(b"nope")), 422)
    assert stored_files(settings) == before
    assert [d["id"] for d in client.get(API).json()] == [kept["id"]]
