"""/healthz, /readyz, /metrics and /api/v1/weights."""

from __future__ import annotations

import random
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.db.tables import Job
from app.main import create_app
from app.settings import Settings
from finetune import weights as engine_weights
from finetune.models import ARCHITECTURES
from tests.app.conftest import COLOURS, make_image, user_id_of
from tests.app.test_models_api import TrainedRun, add_model, train_once


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train_once(tmp_path_factory)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_healthz_and_readyz(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "queue": "ok", "pixel_store": "ok"}
    # This host's pixel store: what it holds and its budget (FINETUNE_CACHE_MAX_BYTES).
    store = body["pixel_store"]
    assert store["used_bytes"] == 0 and store["shards"] == 0 and store["max_bytes"] > 0

    # A failed check is a 503 that names it.
    app: Any = client.app
    monkeypatch.setattr(app.state.queue, "ping", lambda: False)
    r = client.get("/readyz")
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "not_ready"
    assert error["details"] == {"database": "ok", "queue": "failed", "pixel_store": "ok"}

    def broken_sessions() -> Any:
        raise OSError("database is down")

    monkeypatch.setattr(app.state, "sessions", broken_sessions)
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["error"]["details"] == {"database": "failed", "queue": "failed", "pixel_store": "ok"}
    assert "database" in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200  # liveness does no I/O


def test_metrics(client: TestClient, trained_run: TrainedRun) -> None:
    app: Any = client.app
    model_id = add_model(client, trained_run)
    with app.state.sessions.begin() as s:
        s.add(
            Job(
                owner_id=user_id_of(client),
                status="running",
                config={},
                arch="lenet",
                weights="none",
                strategy="full",
                run_key="runs/x",
            )
        )
    app.state.queue.enqueue("not-a-job")  # a message waiting: no worker runs in this test
    png = make_image(COLOURS["red"], random.Random(0))
    assert client.post(f"/api/v1/models/{model_id}/predict", files=[("images", ("a.png", png))] * 3).status_code == 200
    assert client.get("/api/v1/models/nope").status_code == 404
    assert client.get("/api/v1/models").status_code == 200
    assert client.get("/no/such/page").status_code == 404

    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    values = samples(r.text)

    def value(name: str, **labels: str) -> float | None:
        return values.get((name, frozenset(labels.items())))

    # Requests by route template, never by raw path.
    assert value("finetune_http_requests_total", method="GET", route="/api/v1/models/{model_id}", status="404") == 1
    assert value("finetune_http_requests_total", method="GET", route="/api/v1/models", status="200") == 1
    assert value("finetune_http_requests_total", method="POST", route="/api/v1/models/{model_id}/predict", status="200")
    assert value("finetune_http_requests_total", method="GET", route="<unmatched>", status="404") == 1
    assert not any("nope" in dict(labels).get("route", "") for _, labels in values)
    count = value("finetune_http_request_duration_seconds_count", method="GET", route="/api/v1/models")
    assert count == 1
    assert value("finetune_queue_depth") == 1
    assert value("finetune_jobs_running") == 1
    assert value("finetune_model_cache_size") == 1
    budget = app.state.pixel_store.max_bytes
    assert value("finetune_pixel_store_bytes", kind="max") == budget
    assert value("finetune_pixel_store_bytes", kind="used") == 0 and value("finetune_pixel_store_shards") == 0
    assert value("finetune_predict_batch_size_count") == 1
    assert value("finetune_predict_batch_size_sum") == 3
    assert value("finetune_predict_images_total") == 3

    # The scrape itself is counted on the next one.
    again = samples(client.get("/metrics").text)
    assert (
        again[
            ("finetune_http_requests_total", frozenset({"method": "GET", "route": "/metrics", "status": "200"}.items()))
        ]
        == 1
    )


def test_each_app_has_its_own_registry(settings: Settings) -> None:
    first, second = create_app(settings), create_app(settings)
    assert first.state.metrics.registry is not second.state.metrics.registry
    with TestClient(first) as client:
        client.get("/healthz")
    assert first.state.metrics.registry.get_sample_value(
        "finetune_http_requests_total", {"method": "GET", "route": "/healthz", "status": "200"}
    )
    assert (
        second.state.metrics.registry.get_sample_value(
            "finetune_http_requests_total", {"method": "GET", "route": "/healthz", "status": "200"}
        )
        is None
    )


def test_weights(client: TestClient, settings: Settings) -> None:
    assert settings.weights_dir is not None
    weights_dir = settings.weights_dir
    r = client.get("/api/v1/weights")
    assert r.status_code == 200, r.text
    rows = {w["arch"]: w for w in r.json()}
    assert list(rows) == list(ARCHITECTURES)
    assert rows["lenet"]["pretrained"] is False and rows["lenet"]["present"] is False
    resnet = rows["resnet18"]
    assert resnet["pretrained"] is True and resnet["present"] is False and resnet["usable"] is False
    assert resnet["folder"] == str(weights_dir)
    assert resnet["url"].startswith("https://") and resnet["url"].endswith(resnet["filename"])
    assert resnet["fetch_command"] == f"finetune weights fetch resnet18 --dir {weights_dir}"
    assert resnet["import_command"] == f"finetune weights import resnet18 FILE --dir {weights_dir}"

    # A file under torchvision's name is present; its content is not the published one, so it fails the hash.
    weights_dir.mkdir(parents=True, exist_ok=True)
    (weights_dir / engine_weights.weights_file("resnet18", weights_dir).filename).write_bytes(b"not weights")
    rows = {w["arch"]: w for w in client.get("/api/v1/weights").json()}
    resnet = rows["resnet18"]
    assert resnet["present"] is True and resnet["size"] == len(b"not weights")
    assert resnet["verified"] is False and resnet["usable"] is False
    assert resnet["fetch_command"]
    assert rows["resnet34"]["present"] is False

    rows = {w["arch"]: w for w in client.get("/api/v1/weights?verify=false").json()}
    assert rows["resnet18"]["present"] is True and rows["resnet18"]["verified"] is None
    assert rows["resnet18"]["usable"] is True and rows["resnet18"]["fetch_command"] is None
