"""Calibration in the service: the model shows its temperature, calibration error and threshold; the owner
sets the threshold with PATCH; predict answers "unknown" below it and keeps the top-k list."""

from __future__ import annotations

import random
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.app.conftest import COLOURS, assert_error, make_image
from tests.app.test_models_api import TrainedRun, add_model, other_user, train_once


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train_once(tmp_path_factory)


@pytest.fixture
def model_id(client: TestClient, trained_run: TrainedRun) -> str:
    return add_model(client, trained_run)


def _predict(client: TestClient, model_id: str) -> list[dict[str, Any]]:
    files = [
        ("images", (f"{c}.png", make_image(rgb, random.Random(i)), "image/png"))
        for i, (c, rgb) in enumerate(COLOURS.items())
    ]
    r = client.post(f"/api/v1/models/{model_id}/predict?top_k=2", files=files)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]  # type: ignore[no-any-return]


def test_the_model_shows_its_calibration_and_chosen_threshold(client: TestClient, model_id: str) -> None:
    body = client.get(f"/api/v1/models/{model_id}").json()
    c = body["calibration"]
    # This small model's validation split is below the minimum: measured, not fitted, and it says so.
    assert c["temperature"] == 1.0 and c["fitted_on"] is None and "too few" in c["note"]
    assert {"ece_before", "ece_after", "reliability_before", "reliability_after"} <= set(c["val"])
    assert len(c["val"]["reliability_after"]) == c["bins"]
    assert c["coverage"][0]["threshold"] == 0.0 and c["coverage"][0]["coverage"] == 1.0
    chosen = c["threshold"]
    assert body["threshold"] == {
        "value": chosen,
        "source": "validation" if chosen is not None else "none",
        "chosen": chosen,
        "target_precision": 0.95,
    }


def test_the_owners_threshold_makes_predict_answer_unknown(client: TestClient, model_id: str) -> None:
    r = client.patch(f"/api/v1/models/{model_id}", json={"threshold": 0})
    assert r.status_code == 200 and r.json()["threshold"]["source"] == "owner"
    for p in _predict(client, model_id):  # 0: never unknown
        assert p["label"] == p["labels"][0]["label"] and len(p["labels"]) == 2

    r = client.patch(f"/api/v1/models/{model_id}", json={"threshold": 1.0})
    assert r.json()["threshold"]["value"] == 1.0
    predictions = _predict(client, model_id)
    for p in predictions:
        top = p["labels"][0]
        assert p["label"] == ("unknown" if top["probability"] < 1.0 else top["label"])
        assert len(p["labels"]) == 2  # the top-k list is kept
    assert any(p["label"] == "unknown" for p in predictions)

    r = client.patch(f"/api/v1/models/{model_id}", json={"threshold": None})  # back to the validation choice
    threshold = r.json()["threshold"]
    assert threshold["source"] in ("validation", "none") and threshold["value"] == threshold["chosen"]


def test_bad_threshold_changes_are_refused(client: TestClient, model_id: str) -> None:
    assert_error(client.patch(f"/api/v1/models/{model_id}", json={"threshold": 1.5}), 422)
    assert_error(client.patch(f"/api/v1/models/{model_id}", json={"threshold": "high"}), 422)
    assert_error(client.patch(f"/api/v1/models/{model_id}", json={}), 422, "nothing_to_change")
    assert_error(client.patch(f"/api/v1/models/{model_id}", json={"name": "x"}), 422)


def test_another_users_model_cannot_be_changed(client: TestClient, trained_run: TrainedRun) -> None:
    theirs = add_model(client, trained_run, owner_id=other_user(client))
    assert_error(client.patch(f"/api/v1/models/{theirs}", json={"threshold": 0.5}), 404, "not_found")


def test_the_model_page_shows_calibration_error_and_the_charts(client: TestClient, model_id: str) -> None:
    body = client.get(f"/api/v1/models/{model_id}").json()
    page = client.get(f"/models/{model_id}").text
    assert 'id="calibration"' in page and 'id="reliability-chart"' in page and 'id="coverage-chart"' in page
    val = body["calibration"]["val"]
    assert f"{val['ece_before'] * 100:.1f}% → {val['ece_after'] * 100:.1f}%" in page
    assert 'id="threshold-form"' in page and "too few (at least 30 are needed)" in page
