"""What a run decides itself, over HTTP: the defaults suggested for a dataset, lr auto and budget_minutes
on a job, and the choices the job process reports (defaults with reasons, the range test, the budget)
stored on the job and shown by its API and page."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.jobs.child import JobReporter
from app.settings import Settings
from finetune.events import BudgetPlanned, DefaultsChosen, LrFound
from tests.app.conftest import assert_error, dataset_files, upload_zip

from .test_jobs_api import create, set_status


@pytest.fixture
def dataset(client: TestClient) -> dict:
    return upload_zip(client, dataset_files(per_class=4))  # 40 px images


def test_suggested_defaults_follow_the_images_and_the_weights(client: TestClient, dataset: dict) -> None:
    url = f"/api/v1/datasets/{dataset['id']}/defaults"
    scratch = client.get(url, params={"model": "resnet18", "weights": "none"})
    assert scratch.status_code == 200, scratch.text
    body = scratch.json()
    assert body["values"]["image_size"] == 40 and body["values"]["hflip"] is False
    reasons = {c["setting"]: c["reason"] for c in body["choices"]}
    assert "the images are 40 px" in reasons["image_size"]
    pretrained = client.get(url, params={"model": "resnet18", "weights": "imagenet"}).json()
    assert pretrained["values"]["image_size"] == 224 and pretrained["values"]["crop_scale_min"] == 0.25
    assert_error(client.get(url, params={"model": "lenet", "weights": "imagenet"}), 400)
    assert client.get(url, params={"model": "vgg99"}).status_code == 422


def test_lr_auto_and_a_budget_are_accepted(client: TestClient, dataset: dict) -> None:
    job = create(client, dataset, lr="auto", budget_minutes=0.5)
    assert job["config"]["lr"] == "auto" and job["config"]["budget_minutes"] == 0.5
    assert create(client, dataset, lr=0.01)["config"]["lr"] == 0.01
    for bad in ({"lr": "fast"}, {"lr": 0}, {"budget_minutes": 0}):
        r = client.post("/api/v1/jobs", json={"dataset_id": dataset["id"], "model": "lenet", "weights": "none", **bad})
        assert r.status_code == 422, r.text


def test_the_choices_a_run_reports_are_on_the_job(client: TestClient, dataset: dict, settings: Settings) -> None:
    job = create(client, dataset, lr="auto", budget_minutes=1)
    set_status(settings, job["id"], status="running", attempt=1)
    reporter = JobReporter(settings, job["id"], 1)
    chosen = [{"setting": "image_size", "value": 40, "reason": "image size 40: the images are 40 px (median)"}]
    reporter(DefaultsChosen(chosen))
    reporter(LrFound(3e-3, "lr_min", [1e-4, 1e-3, 1e-2], [2.0, 1.0, 3.0]))
    reporter(BudgetPlanned(60.0, 7, 500.0, 2000.0, 55.0, "7 epochs of 6.0 s fit the budget of 1 min", eta=50.0))
    got = client.get(f"/api/v1/jobs/{job['id']}").json()
    assert got["choices"]["defaults"] == chosen
    assert got["choices"]["lr_finder"]["lr"] == 3e-3 and got["choices"]["lr_finder"]["losses"] == [2.0, 1.0, 3.0]
    assert got["choices"]["budget"]["epochs"] == 7 and got["eta_seconds"] == 50.0
    page = client.get(f"/jobs/{job['id']}")
    assert page.status_code == 200
    assert "image size 40: the images are 40 px (median)" in page.text
    assert 'id="lr-chart"' in page.text and "7 epochs of 6.0 s fit the budget" in page.text
