"""The core flow over HTTP: upload a zip, train through the real queue and a real job process."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.app.conftest import upload_zip, wait_for_job


def test_upload_train_and_finish(client: TestClient, worker: object) -> None:
    dataset = upload_zip(client)
    assert dataset["num_classes"] == 3
    r = client.post(
        "/api/v1/jobs", json={"dataset_id": dataset["id"], "model": "lenet", "weights": "none", "epochs": 3}
    )
    assert r.status_code == 202, r.text
    job = wait_for_job(client, r.json()["id"], ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job
    assert [m["epoch"] for m in job["metrics"]] == [1, 2, 3]
    assert job["model_id"]
