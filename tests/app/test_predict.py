"""POST /api/v1/models/{id}/predict: the request forms, the answer's contract, limits, bad images, the
micro-batcher under concurrent requests and the LRU model cache."""

from __future__ import annotations

import asyncio
import io
import random
import shutil
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import COLOURS, Account, authed_client, make_image
from tests.app.test_models_api import TrainedRun, add_model, run_dir, train_once


def _tiff() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(out, "TIFF")  # a real image, but not an accepted format
    return out.getvalue()


def image(colour: str = "red", seed: int = 0, fmt: str = "PNG") -> bytes:
    return make_image(COLOURS[colour], random.Random(seed), fmt=fmt)


def predict_url(model_id: str, top_k: int | None = None) -> str:
    query = f"?top_k={top_k}" if top_k is not None else ""
    return f"/api/v1/models/{model_id}/predict{query}"


def labels_of(prediction: dict[str, Any]) -> list[tuple[str, float]]:
    return [(p["label"], p["probability"]) for p in prediction["labels"]]


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert [p["label"] for p in a["labels"]] == [p["label"] for p in b["labels"]]
    assert [p["probability"] for p in a["labels"]] == pytest.approx([p["probability"] for p in b["labels"]], abs=1e-5)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train_once(tmp_path_factory)


@pytest.fixture
def model_id(client: TestClient, trained_run: TrainedRun) -> str:
    return add_model(client, trained_run)


def metric_value(client: TestClient, name: str, **labels: str) -> float | None:
    app: Any = client.app
    return app.state.metrics.registry.get_sample_value(name, labels or None)  # type: ignore[no-any-return]


def test_multipart_one_image(client: TestClient, model_id: str) -> None:
    r = client.post(predict_url(model_id, top_k=2), files={"images": ("red.png", image("red"), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_id"] == model_id
    assert len(body["predictions"]) == 1
    labels = body["predictions"][0]["labels"]
    assert len(labels) == 2
    assert set(labels[0]) == {"label", "index", "probability"}
    classes = ["blue", "green", "red"]
    for p in labels:
        assert classes[p["index"]] == p["label"]
        assert 0.0 <= p["probability"] <= 1.0
    assert labels[0]["probability"] >= labels[1]["probability"]

    # top_k is capped by the number of classes; then the probabilities cover every class and sum to 1.
    r = client.post(predict_url(model_id, top_k=100), files={"images": ("a.png", image())})
    assert r.status_code == 200, r.text
    labels = r.json()["predictions"][0]["labels"]
    assert sorted(p["label"] for p in labels) == ["blue", "green", "red"]
    assert sum(p["probability"] for p in labels) == pytest.approx(1.0, abs=1e-5)
    # The default is 5 labels, so again every class here.
    r = client.post(predict_url(model_id), files={"images": ("a.png", image())})
    assert len(r.json()["predictions"][0]["labels"]) == 3


def test_several_images_in_order_and_same_image_same_answer(client: TestClient, model_id: str) -> None:
    images = [image("red", 1), image("green", 2, "JPEG"), image("blue", 3, "BMP"), image("red", 4, "GIF")]
    singles = []
    for data in images:
        r = client.post(predict_url(model_id, top_k=3), files={"images": ("x", data)})
        assert r.status_code == 200, r.text
        singles.append(r.json()["predictions"][0])
    r = client.post(
        predict_url(model_id, top_k=3),
        files=[("images", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)],
        data={"note": "text fields are ignored"},
    )
    assert r.status_code == 200, r.text
    batch = r.json()["predictions"]
    assert len(batch) == len(images)
    for one, together in zip(singles, batch, strict=True):
        assert_same(one, together)
    again = client.post(predict_url(model_id, top_k=3), files={"images": ("x", images[0])}).json()["predictions"][0]
    assert_same(again, singles[0])  # the same image, answered alone again (float noise only)


def test_raw_body(client: TestClient, model_id: str) -> None:
    data = image("green", 5)
    form = client.post(predict_url(model_id, top_k=3), files={"images": ("g.png", data)})
    for content_type in ("image/png", "application/octet-stream"):
        raw = client.post(predict_url(model_id, top_k=3), content=data, headers={"Content-Type": content_type})
        assert raw.status_code == 200, raw.text
        assert len(raw.json()["predictions"]) == 1
        assert_same(raw.json()["predictions"][0], form.json()["predictions"][0])
    for fmt, mime in [("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("BMP", "image/bmp"), ("GIF", "image/gif")]:
        r = client.post(predict_url(model_id), content=image("blue", 6, fmt), headers={"Content-Type": mime})
        assert r.status_code == 200, (fmt, r.text)


def test_top_k_out_of_range(client: TestClient, model_id: str) -> None:
    for top_k in (0, -1, 101, "many"):
        r = client.post(predict_url(model_id) + f"?top_k={top_k}", files={"images": ("a.png", image())})
        assert r.status_code == 422, top_k
        assert r.json()["error"]["code"] == "invalid"
        assert "top_k" in r.json()["error"]["message"]
    r = client.post(predict_url(model_id, top_k=100), files={"images": ("a.png", image())})
    assert r.status_code == 200


def test_bad_images_are_4xx_with_the_engines_reason(client: TestClient, model_id: str) -> None:
    good = image()
    truncated = good[: len(good) // 2]
    cases = [
        ("text", b"this is not an image"),
        ("truncated", truncated),
        ("empty", b""),
        ("tiff", _tiff()),
    ]
    for name, data in cases:
        r = client.post(predict_url(model_id), files=[("images", ("ok.png", good)), ("images", (f"{name}.png", data))])
        assert r.status_code == 422, (name, r.text)
        error = r.json()["error"]
        assert error["code"] == "bad_image", (name, error)
        assert error["details"] == {"index": 1, "filename": f"{name}.png"}
        assert error["message"]
    r = client.post(predict_url(model_id), content=truncated, headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_image"
    assert "truncated" in r.json()["error"]["message"]
    r = client.post(predict_url(model_id), content=b"GIF89a nonsense", headers={"Content-Type": "image/gif"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_image"


def test_unsupported_bodies(client: TestClient, model_id: str) -> None:
    r = client.post(predict_url(model_id), content=b'{"x": 1}', headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"
    r = client.post(predict_url(model_id), content=b"", headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_images"
    r = client.post(predict_url(model_id), data={"name": "no files"}, files={"other": ("a.png", image())})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_field"
    r = client.post(predict_url(model_id), content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400


def test_unknown_model_and_model_whose_files_are_gone(client: TestClient, model_id: str) -> None:
    r = client.post(predict_url("0" * 32), files={"images": ("a.png", image())})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    shutil.rmtree(run_dir(client, model_id))
    r = client.post(predict_url(model_id), files={"images": ("a.png", image())})
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "model_unavailable"


@pytest.fixture
def small_limits(settings: Settings) -> Settings:
    settings.max_predict_bytes = 4000
    settings.max_predict_images = 2
    return settings


def test_limits(small_limits: Settings, trained_run: TrainedRun, admin: Account) -> None:
    with authed_client(create_app(small_limits), admin) as client:
        model_id = add_model(client, trained_run)
        small = image(seed=1)
        assert len(small) < 1000
        ok = client.post(predict_url(model_id), files=[("images", ("a.png", small)), ("images", ("b.png", small))])
        assert ok.status_code == 200, ok.text

        r = client.post(predict_url(model_id), files=[("images", (f"{i}.png", small)) for i in range(3)])
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "too_many_images"

        big = b"\x89PNG" + bytes(5000)
        r = client.post(predict_url(model_id), content=big, headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield bytes(1000)

        r = client.post(predict_url(model_id), content=chunks(), headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_concurrent_requests_are_batched_and_the_model_loads_once(
    settings: Settings,
    trained_run: TrainedRun,
    admin: Account,
) -> None:
    settings.predict_max_wait_ms = 150  # wide enough that every request below joins a batch on a slow machine
    app = create_app(settings)
    images = [image(c, seed) for seed in range(4) for c in ("red", "green", "blue", "red")]

    async def scenario() -> tuple[list[httpx2.Response], list[httpx2.Response]]:
        async with app.router.lifespan_context(app):
            model_id = add_model(app, trained_run, owner_id=admin.user_id)
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://test", headers=admin.headers) as ac:
                url = predict_url(model_id, top_k=3)
                together = await asyncio.gather(*(ac.post(url, files={"images": ("i.png", d)}) for d in images))
                alone = [await ac.post(url, files={"images": ("i.png", d)}) for d in images[:4]]
            return together, alone

    together, alone = asyncio.run(scenario())
    assert [r.status_code for r in together] == [200] * len(images)
    for a, t in zip(alone, together, strict=False):
        assert_same(a.json()["predictions"][0], t.json()["predictions"][0])

    registry = app.state.metrics.registry
    batches = registry.get_sample_value("finetune_predict_batch_size_count")
    images_seen = registry.get_sample_value("finetune_predict_batch_size_sum")
    singles = registry.get_sample_value("finetune_predict_batch_size_bucket", {"le": "1.0"})
    assert images_seen == len(images) + 4
    assert batches is not None and singles is not None
    assert batches - singles >= 1, "no batch of more than one image was formed"
    assert batches < len(images) + 4
    assert registry.get_sample_value("finetune_model_loads_total") == 1  # 16 cold requests, one load


def test_lru_cache_evicts_the_least_recently_used_model(
    settings: Settings, trained_run: TrainedRun, admin: Account
) -> None:
    settings.model_cache_size = 1
    with authed_client(create_app(settings), admin) as client:
        first = add_model(client, trained_run, name="first")
        second = add_model(client, trained_run, name="second")
        app: Any = client.app
        cache = app.state.model_cache
        for model in (first, first, second, first):
            r = client.post(predict_url(model), files={"images": ("a.png", image())})
            assert r.status_code == 200, r.text
            assert model in cache and len(cache) == 1
        assert metric_value(client, "finetune_model_loads_total") == 3
