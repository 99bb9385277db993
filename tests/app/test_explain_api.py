"""POST /models/{id}/predict?explain=gradcam: a Grad-CAM heat map per image, of the input image's size."""

from __future__ import annotations

import base64
import io
import random

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.app.conftest import COLOURS, assert_error, make_image
from tests.app.test_models_api import TrainedRun, add_model, train_once


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train_once(tmp_path_factory)


def _image(size: tuple[int, int]) -> bytes:
    img = Image.open(io.BytesIO(make_image(COLOURS["red"], random.Random(0)))).resize(size)
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_gradcam_returns_a_heatmap_of_each_input_images_size(client: TestClient, trained_run: TrainedRun) -> None:
    model_id = add_model(client, trained_run)
    files = [("images", ("a.png", _image((40, 40)), "image/png")), ("images", ("b.png", _image((70, 45)), "image/png"))]
    r = client.post(f"/api/v1/models/{model_id}/predict?explain=gradcam&top_k=2", files=files)
    assert r.status_code == 200, r.text
    for prediction, size in zip(r.json()["predictions"], [(40, 40), (70, 45)], strict=True):
        cam = prediction["gradcam"]
        assert cam["label"] == prediction["labels"][0]["label"] and (cam["width"], cam["height"]) == size
        png = Image.open(io.BytesIO(base64.b64decode(cam["png"])))
        assert png.format == "PNG" and png.mode == "L" and png.size == size

    plain = client.post(f"/api/v1/models/{model_id}/predict", files=files[:1]).json()
    assert "gradcam" not in plain["predictions"][0]  # only when asked
    assert_error(client.post(f"/api/v1/models/{model_id}/predict?explain=lime", files=files[:1]), 422)
