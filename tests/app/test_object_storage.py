"""Datasets, run folders and models in an S3-compatible bucket (FINETUNE_STORAGE_BACKEND=s3), against a real
S3 server started here (moto's standalone server on loopback): nothing lands on the data folder, each host
keeps a local copy of what it reads, and a run continues on a host that has never seen it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.objectstore import ObjectStore
from app.settings import Settings
from tests.app.conftest import Account, authed_client, dataset_files, sqlite_only, upload_zip, wait_for_job, wait_until
from tests.app.test_jobs_lifecycle import API, FINISHED, LONG, assert_continued_from_checkpoint, create, wait_gone

BUCKET = "finetune-test"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for this module."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 60, "the S3 server")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


@pytest.fixture
def s3_settings(settings: Settings, s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)  # the worker processes inherit them too
    settings.storage_backend = "s3"
    settings.s3_bucket = BUCKET
    settings.s3_prefix = tmp_path.name  # a prefix per test: one bucket for the module
    settings.s3_endpoint_url = s3_server
    settings.local_cache_dir = tmp_path / "api-host-cache"
    store = bucket(settings)
    try:
        store.client.create_bucket(Bucket=BUCKET)
    except store.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return settings


def bucket(settings: Settings) -> ObjectStore:
    return ObjectStore(BUCKET, settings.s3_prefix, settings.s3_endpoint_url, "us-east-1")


@pytest.fixture
def s3_client(s3_settings: Settings, admin: Account) -> Iterator[TestClient]:
    with authed_client(create_app(s3_settings), admin) as c:
        yield c


def on_host(settings: Settings, tmp_path: Path, name: str) -> None:
    """The next worker started runs as another host: a cache folder of its own."""
    settings.local_cache_dir = tmp_path / f"{name}-cache"


@sqlite_only
def test_datasets_runs_and_models_live_in_the_bucket(
    s3_client: TestClient, s3_settings: Settings, tmp_path: Path, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    client, settings, store = s3_client, s3_settings, bucket(s3_settings)
    dataset = upload_zip(client, dataset_files(per_class=10))
    objects = store.listing(f"datasets/{dataset['id']}")
    assert "report.json" in objects and sum(n.startswith("images/") for n in objects) >= 30
    assert not (settings.data_dir / "datasets").exists()  # nothing on the data folder
    assert client.get(f"/api/v1/datasets/{dataset['id']}").status_code == 200

    on_host(settings, tmp_path, "gpu-1")
    start_worker()
    job = create(client, dataset, epochs=2)
    done = wait_for_job(client, job["id"], FINISHED)
    assert done["status"] == "succeeded", done
    run = store.listing(f"runs/{job['id']}")
    assert {"run.json", "report.json", "last.symlink", "best.symlink"} <= set(run)
    assert any(n.endswith("model.safetensors") for n in run)
    worker_copy = tmp_path / "gpu-1-cache" / "objects"
    assert (worker_copy / "datasets" / dataset["id"] / "images").is_dir()  # the worker's local copy
    assert not (settings.data_dir / "runs").exists()

    # The API host fetches the model it serves into its own cache.
    image = next(iter(dataset_files(per_class=1, seed=3).values()))
    r = client.post(f"/api/v1/models/{done['model_id']}/predict", files={"images": ("x.png", image)})
    assert r.status_code == 200, r.text
    assert (tmp_path / "api-host-cache" / "objects" / "runs" / job["id"] / "last").is_symlink()
    assert client.get(f"/api/v1/models/{done['model_id']}/download").status_code == 200

    # Deleting the model and its job removes the run from the bucket.
    assert client.delete(f"/api/v1/models/{done['model_id']}").status_code == 204
    assert client.delete(f"{API}/{job['id']}").status_code == 204
    assert store.listing(f"runs/{job['id']}") == {}


@sqlite_only
def test_a_run_continues_on_a_host_that_never_saw_it(
    s3_client: TestClient, s3_settings: Settings, tmp_path: Path, start_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    client, settings, store = s3_client, s3_settings, bucket(s3_settings)
    dataset = upload_zip(client, dataset_files(per_class=10))
    on_host(settings, tmp_path, "gpu-1")
    first = start_worker()
    job = create(client, dataset, epochs=LONG)
    wait_until(lambda: store.exists(f"runs/{job['id']}/last"), 120, "a checkpoint in the bucket", interval=0.2)
    assert client.post(f"{API}/{job['id']}/cancel").status_code == 200
    assert wait_for_job(client, job["id"], FINISHED, timeout=60)["status"] == "cancelled"
    wait_gone(job["id"])
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    target = store.client.get_object(Bucket=BUCKET, Key=f"{settings.s3_prefix}/runs/{job['id']}/last.symlink")
    checkpoint = int(target["Body"].read().decode().rsplit("-", 1)[1])
    shutil.rmtree(tmp_path / "gpu-1-cache")  # that host is gone, with its disk

    on_host(settings, tmp_path, "gpu-2")
    start_worker()
    assert client.post(f"{API}/{job['id']}/resume").status_code == 202
    done = wait_for_job(client, job["id"], FINISHED, timeout=300)  # ~60 epochs: minutes on a loaded machine
    assert_continued_from_checkpoint(settings, done, checkpoint, LONG)
    assert (tmp_path / "gpu-2-cache" / "objects" / "runs" / job["id"] / "checkpoints").is_dir()
    assert not (tmp_path / "gpu-1-cache").exists()
