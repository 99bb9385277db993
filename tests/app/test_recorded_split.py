"""What the dataset page shows is what a job trains on: the images the upload's check accepted, in the split
it recorded. A job asking for another seed or fractions splits those same images its own way, and its row
and page say so.

Before, a job checked the folder again with its own options and no pixel limit: an image the upload had
skipped as too large was trained on, and the counts a job used differed from the dataset's page."""

from __future__ import annotations

import io
import json
import random
import subprocess
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.db import session_scope
from app.db.tables import Job
from app.settings import Settings
from app.storage import Storage
from tests.app.conftest import dataset_files, sqlite_only, upload_zip, wait_for_job

TINY = {"model": "lenet", "weights": "none", "epochs": 1, "batch_size": 8}
LIMIT = 50 * 50  # the generated images are about 44x40; the large ones are 60x60


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_image_pixels": LIMIT})


def large_png(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (60, 60), tuple(rng.randint(0, 255) for _ in range(3)))  # type: ignore[arg-type]
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def run_files(settings: Settings, job_id: str) -> dict[str, str]:
    """{file as shown: split} of the run folder's dataset.json (what the engine trained on)."""
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        run_key = job.run_key
    report = json.loads((Storage(settings.data_dir).path(run_key) / "dataset.json").read_text())
    return {f["path"]: f["split"] for f in report["files"]}


@sqlite_only
def test_jobs_train_on_the_split_the_dataset_recorded(
    client: TestClient, settings: Settings, worker: subprocess.Popen[bytes]
) -> None:
    files = {**dataset_files(per_class=10), **{f"red/large-{i}.png": large_png(i) for i in range(3)}}
    dataset = upload_zip(client, files)
    skipped = {s["path"] for s in dataset["report"]["skipped"]}
    assert skipped == {f"red/large-{i}.png" for i in range(3)}  # over the service's pixel limit
    report = client.get(f"/api/v1/datasets/{dataset['id']}/report").json()
    recorded = {f["path"]: f["split"] for f in report["files"]}

    same = client.post("/api/v1/jobs", json={"dataset_id": dataset["id"], **TINY}).json()
    done = wait_for_job(client, same["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert run_files(settings, same["id"]) == recorded  # every image and split as the dataset's page shows
    split: dict[str, Any] = done["split"]
    assert split["source"] == "recorded" and split["counts"] == dataset["report"]["counts"]

    own = client.post("/api/v1/jobs", json={"dataset_id": dataset["id"], **TINY, "seed": 5, "val_fraction": 0.3})
    done = wait_for_job(client, own.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    trained = run_files(settings, own.json()["id"])
    assert set(trained) == set(recorded)  # the same accepted images, never the skipped ones...
    assert trained != recorded  # ...split its own way, recorded in its run folder
    assert done["split"]["source"] == "drawn" and done["split"]["seed"] == 5
    assert done["split"]["totals"]["val"] == sum(1 for s in trained.values() if s == "val")
    page = client.get(f"/jobs/{own.json()['id']}")
    assert page.status_code == 200 and 'id="data-split"' in page.text
    assert "own split: seed 5, 30% validation, 10% test" in page.text
