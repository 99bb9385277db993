"""Exports and serving through the API: the parity-checked export download, the int8 choice behind its
measured accuracy change, the runtime the service chooses, and the predict path's one-second memory of keys."""

from __future__ import annotations

import io
import json
import random
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from fastapi.testclient import TestClient

from app.db import session_scope
from app.services import auth
from app.services.keycache import PredictLookups
from app.settings import Settings
from finetune.export import serving_network
from finetune.predict import Predictor
from finetune.serving import usable_cpus
from tests.app.conftest import COLOURS, assert_error, make_account, make_image, wait_until
from tests.app.test_models_api import TrainedRun, add_model, run_dir, train_once


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train_once(tmp_path_factory)


@pytest.fixture
def model_id(client: TestClient, trained_run: TrainedRun) -> str:
    return add_model(client, trained_run)


def png(colour: str = "red", seed: int = 0) -> bytes:
    return make_image(COLOURS[colour], random.Random(seed))


def predict(client: TestClient, model_id: str, data: bytes, **kwargs: Any) -> Any:
    return client.post(f"/api/v1/models/{model_id}/predict?top_k=3", files={"images": ("a.png", data)}, **kwargs)


def loaded_here(client: TestClient, model_id: str) -> dict[str, Any] | None:
    return client.get(f"/api/v1/models/{model_id}").json()["serving"]["loaded_here"]  # type: ignore[no-any-return]


def chosen(client: TestClient, model_id: str) -> dict[str, Any]:
    """Once the service has chosen the model's runtime (in the background, after the first predict)."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (info := loaded_here(client, model_id)) and not info["choosing"] and info, 120, "the runtime choice"
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_onnx_export_download_is_checked_and_loads_in_onnxruntime(client: TestClient, model_id: str) -> None:
    r = client.get(f"/api/v1/models/{model_id}/export?format=onnx")
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].endswith(f'lenet-{model_id}.onnx"')
    assert "top1_agreement=1.000000" in r.headers["x-parity"]
    session = onnxruntime.InferenceSession(r.content)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == ["blue", "green", "red"]
    crop = json.loads(meta["preprocessing"])["crop_size"]
    probs = session.run(["probabilities"], {"image": np.zeros((2, crop, crop, 3), np.uint8)})[0]
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)

    model = client.get(f"/api/v1/models/{model_id}").json()
    onnx = model["exports"]["onnx"]
    assert onnx["accepted"] and onnx["parity"]["split"] == "test" and onnx["parity"]["top1_agreement"] == 1.0
    assert onnx["parity"]["max_abs_prob_diff"] <= 1e-4 and onnx["download_url"].endswith("format=onnx")
    page = client.get(f"/models/{model_id}").text
    assert "passed" in page and "Export and check" in page  # ONNX checked; TorchScript not made yet

    assert_error(client.get(f"/api/v1/models/{model_id}/export?format=pickle"), 400, "bad_format")
    r = client.get(f"/api/v1/models/{model_id}/export?format=torchscript")
    assert r.status_code == 200 and r.headers["content-disposition"].endswith('.torchscript.pt"')


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_export_that_disagrees_is_refused_with_its_figures(
    client: TestClient, model_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def drifted(predictor: Predictor) -> torch.nn.Module:
        net = serving_network(predictor)
        with torch.no_grad():
            net.scale *= 1.5
        return net

    monkeypatch.setattr("finetune.export.serving_network", drifted)
    error = assert_error(client.get(f"/api/v1/models/{model_id}/export?format=onnx"), 409, "export_parity_failed")
    assert error["details"]["parity"]["max_abs_prob_diff"] > 1e-4
    assert client.get(f"/api/v1/models/{model_id}").json()["exports"]["onnx"]["accepted"] is False
    assert "refused" in client.get(f"/models/{model_id}").text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_int8_is_turned_on_only_after_its_accuracy_change_is_measured(client: TestClient, model_id: str) -> None:
    before = predict(client, model_id, png("red")).json()["predictions"][0]["labels"]
    assert chosen(client, model_id)["precision"] == "fp32"

    refused = client.put(f"/api/v1/models/{model_id}/serving", json={"precision": "int8"})
    assert_error(refused, 409, "int8_not_measured")
    assert_error(client.put(f"/api/v1/models/{model_id}/serving", json={"precision": "int4"}), 422)

    r = client.post(f"/api/v1/models/{model_id}/exports?format=onnx-int8")
    assert r.status_code == 200, r.text
    check = r.json()["parity"]
    assert check["accuracy_change_points"] is not None and check["thresholds"] is None
    model = client.get(f"/api/v1/models/{model_id}").json()
    assert model["serving"]["int8_check"] == check
    assert "changes the test accuracy by" in client.get(f"/models/{model_id}").text

    r = client.put(f"/api/v1/models/{model_id}/serving", json={"precision": "int8"})
    assert r.status_code == 200, r.text
    assert r.json()["precision"] == "int8"
    after = predict(client, model_id, png("red"))
    assert after.status_code == 200, after.text
    info = chosen(client, model_id)
    assert info["runtime"] == "onnxruntime-int8" and info["precision"] == "int8"
    labels = predict(client, model_id, png("red")).json()["predictions"][0]["labels"]
    assert [p["probability"] for p in labels] == pytest.approx([p["probability"] for p in before], abs=0.05)
    assert client.put(f"/api/v1/models/{model_id}/serving", json={"precision": "fp32"}).json()["precision"] == "fp32"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_service_serves_the_runtime_it_measured_fastest(client: TestClient, model_id: str) -> None:
    first = predict(client, model_id, png("blue")).json()
    info = chosen(client, model_id)
    measured = client.get(f"/api/v1/models/{model_id}").json()["serving"]["measured"]
    (device,) = measured
    fp32 = measured[device]["fp32"]
    assert {"onnxruntime", "torch-eager", "torch-channels-last"} <= set(fp32["images_per_sec"])
    assert info["runtime"] == fp32["winner"] == max(fp32["images_per_sec"], key=fp32["images_per_sec"].get)
    # Its batches are capped at what it runs in predict_batch_ms (100) at its measured speed, at most 32.
    assert info["max_batch"] == max(1, min(32, int(fp32["images_per_sec"][fp32["winner"]] * 0.1)))
    # ONNX Runtime passes may run side by side under load (predict_lanes, 2), one per core at most.
    assert info["lanes"] == (min(2, usable_cpus()) if info["runtime"] == "onnxruntime" else 1)
    # Whatever won, the answer is the one PyTorch gave before the switch.
    again = predict(client, model_id, png("blue")).json()
    a, b = first["predictions"][0]["labels"], again["predictions"][0]["labels"]
    assert [p["label"] for p in a] == [p["label"] for p in b]
    assert [p["probability"] for p in a] == pytest.approx([p["probability"] for p in b], abs=1e-4)
    assert (run_dir(client, model_id) / "serving.json").is_file()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_revoked_key_stops_predicting_within_a_second(settings: Settings, client: TestClient, model_id: str) -> None:
    app: Any = client.app
    now = [1000.0]
    lookups = PredictLookups()
    for cache in (lookups.keys, lookups.models):
        cache.clock = lambda: now[0]  # type: ignore[method-assign]
    app.state.predict_lookups = lookups
    user = make_account(settings, "carol", admin=True)
    headers = user.headers
    assert predict(client, model_id, png(), headers=headers).status_code == 200
    with session_scope(settings.db_url) as s:
        assert auth.revoke_key(s, user.key[:10]) == 1
    # Remembered for at most a second: still answered just after the revocation...
    now[0] += 0.5
    assert predict(client, model_id, png(), headers=headers).status_code == 200
    # ...and refused once the second has passed, as everywhere else.
    now[0] += 0.5
    assert_error(predict(client, model_id, png(), headers=headers), 401, "unauthorized")
    assert_error(client.get("/api/v1/models", headers=headers), 401, "unauthorized")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_remembered_keys_and_models_still_check_the_owner(
    settings: Settings, client: TestClient, model_id: str
) -> None:
    assert predict(client, model_id, png()).status_code == 200  # the admin's request: the model is remembered
    bob = make_account(settings, "bob")
    with TestClient(client.app, headers=bob.headers) as other:
        assert_error(predict(other, model_id, png()), 404, "not_found")


def test_raw_jpeg_body_is_answered(client: TestClient, model_id: str) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (220, 20, 20)).save(buf, "JPEG")
    r = client.post(
        f"/api/v1/models/{model_id}/predict", content=buf.getvalue(), headers={"Content-Type": "image/jpeg"}
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1
    assert_error(
        client.post(f"/api/v1/models/{model_id}/predict", content=b"", headers={"Content-Type": "image/jpeg"}),
        400,
        "no_images",
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_predict_is_served_by_pytorch_when_onnxruntime_is_missing(
    client: TestClient, model_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("finetune.serving.onnx_available", lambda: False)
    r = predict(client, model_id, png("green"))
    assert r.status_code == 200, r.text
    info = chosen(client, model_id)
    assert info["runtime"].startswith("torch-") and "not installed" in info["note"]
    a, b = (
        r.json()["predictions"][0]["labels"],
        predict(client, model_id, png("green")).json()["predictions"][0]["labels"],
    )
    assert [p["label"] for p in a] == [p["label"] for p in b]
    assert [p["probability"] for p in a] == pytest.approx([p["probability"] for p in b], abs=1e-5)
