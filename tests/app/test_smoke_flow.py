"""The core flow over HTTP on PostgreSQL: upload a zip, train through the real queue and a real job process.

The worker-based tests in test_jobs_lifecycle.py run on SQLite; this one proves the worker, the job process
and their fenced writes work the same against PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.db import session_scope
from app.db.tables import Model
from app.settings import Settings
from tests.app.conftest import dataset_files, metrics_held, read_events, upload_zip, wait_for_job


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_upload_train_and_finish(client: TestClient, settings: Settings, worker: object) -> None:
    name = "a dataset with the longest name allowed " + "x" * 160  # PostgreSQL enforces column lengths
    dataset = upload_zip(client, name=name)
    assert dataset["num_classes"] == 3 and dataset["name"] == name
    r = client.post(
        "/api/v1/jobs", json={"dataset_id": dataset["id"], "model": "lenet", "weights": "none", "epochs": 3}
    )
    assert r.status_code == 202, r.text
    events = read_events(client, r.json()["id"])
    assert events[-1] == ("end", {"id": r.json()["id"], "status": "succeeded"})
    assert [m["epoch"] for m in metrics_held(events)] == [1, 2, 3]
    job = wait_for_job(client, r.json()["id"], ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1
    assert [m["epoch"] for m in job["metrics"]] == [1, 2, 3]
    assert job["model_id"]
    with session_scope(settings.db_url) as s:
        model = s.get(Model, job["model_id"])
        assert model is not None and model.name.startswith("a dataset with") and model.name.endswith("lenet")
        assert len(model.name) <= 200

    # ...and the trained model answers predictions over HTTP.
    image = next(iter(dataset_files(per_class=1, seed=99).values()))
    r = client.post(f"/api/v1/models/{job['model_id']}/predict?top_k=2", files={"images": ("x.png", image)})
    assert r.status_code == 200, r.text
    labels = r.json()["predictions"][0]["labels"]
    assert len(labels) == 2 and {label["label"] for label in labels} <= {"red", "green", "blue"}
    assert 0.0 < sum(label["probability"] for label in labels) <= 1.0 + 1e-6
