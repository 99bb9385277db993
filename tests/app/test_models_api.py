"""/api/v1/models: list, get, download, delete, owner checks. The model is a real run trained once per
session with the engine (lenet, 2 epochs, 32 px) and copied into each test's data folder."""

from __future__ import annotations

import io
import json
import random
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db.tables import Job, Model, User, new_id
from finetune.checkpoint import META_FILE, MODEL_FILE
from finetune.config import TrainConfig
from finetune.predict import Predictor
from tests.app.conftest import COLOURS, dataset_files, make_image, user_id_of


@dataclass(frozen=True)
class TrainedRun:
    path: Path
    classes: list[str]
    evaluation: dict[str, Any]
    config: dict[str, Any]


_trained: TrainedRun | None = None


def train_once(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One small trained run for the whole session, however many test modules ask for it."""
    global _trained
    if _trained is None:
        from finetune.train import train

        root = tmp_path_factory.mktemp("trained")
        data = root / "data"
        for rel, content in dataset_files(per_class=8).items():
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            (data / rel).write_bytes(content)
        config = TrainConfig(
            model="lenet",
            weights="none",
            epochs=2,
            image_size=32,
            batch_size=8,
            data=str(data),
            out=str(root / "run"),
            cache_dir=str(root / "cache"),
            device="cpu",
        )
        result = train(config)
        config_dict = {k: v for k, v in config.to_dict().items() if k not in ("data", "out", "cache_dir")}
        _trained = TrainedRun(root / "run", sorted(COLOURS), result.evaluation, config_dict)
    return _trained


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train_once(tmp_path_factory)


def add_model(
    target: TestClient | FastAPI,
    run: TrainedRun,
    *,
    with_job: bool = True,
    owner_id: str | None = None,
    name: str = "shapes",
) -> str:
    """Copy the trained run into the app's storage and insert its rows as a finished job would."""
    app: Any = target.app if isinstance(target, TestClient) else target
    storage = app.state.storage
    assert owner_id or isinstance(target, TestClient), "pass owner_id with an app"
    owner = owner_id or user_id_of(target)  # type: ignore[arg-type]
    job_id = new_id()
    key = storage.run_key(job_id)
    shutil.copytree(run.path, storage.path(key), symlinks=True)
    with app.state.sessions.begin() as s:
        if with_job:
            s.add(
                Job(
                    id=job_id,
                    owner_id=owner,
                    dataset_id=None,
                    status="succeeded",
                    config=run.config,
                    arch="lenet",
                    weights="none",
                    strategy="full",
                    run_key=key,
                )
            )
            s.flush()
        model = Model(
            owner_id=owner,
            job_id=job_id if with_job else None,
            name=name,
            arch="lenet",
            num_classes=len(run.classes),
            classes=run.classes,
            evaluation=run.evaluation,
            config=run.config,
            run_key=key,
            size_bytes=storage.size(key),
        )
        s.add(model)
        s.flush()
        return model.id


def other_user(client: TestClient) -> str:
    """Make the local user an ordinary user and add another one; returns the other user's id."""
    app: Any = client.app
    with app.state.sessions.begin() as s:
        s.execute(update(User).where(User.id == user_id_of(client)).values(is_admin=False))
        user = User(name=f"other-{new_id()[:8]}", is_admin=False)
        s.add(user)
        s.flush()
        return user.id


def run_dir(client: TestClient, model_id: str) -> Path:
    app: Any = client.app
    with app.state.sessions() as s:
        model = s.get(Model, model_id)
        assert model is not None
        return app.state.storage.path(model.run_key)  # type: ignore[no-any-return]


def test_list_and_get(client: TestClient, trained_run: TrainedRun) -> None:
    assert client.get("/api/v1/models").json() == []
    model_id = add_model(client, trained_run)

    listed = client.get("/api/v1/models").json()
    assert [m["id"] for m in listed] == [model_id]
    summary = listed[0]
    assert summary["arch"] == "lenet" and summary["classes"] == ["blue", "green", "red"]
    assert summary["val_top1"] == trained_run.evaluation["val"]["top1"]
    assert summary["best_epoch"] == trained_run.evaluation["epoch"]

    r = client.get(f"/api/v1/models/{model_id}")
    assert r.status_code == 200, r.text
    model = r.json()
    assert model["num_classes"] == 3
    for split in ("val", "test"):
        metrics = model[split]
        assert metrics["top1"] == trained_run.evaluation[split]["top1"]
        assert [c["class"] for c in metrics["per_class"]] == ["blue", "green", "red"]
        assert {"precision", "recall", "f1", "support"} <= set(metrics["per_class"][0])
        matrix = metrics["confusion_matrix"]
        assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
        assert sum(map(sum, matrix)) == metrics["count"]
    assert model["config"]["model"] == "lenet" and model["config"]["epochs"] == 2
    assert model["download_url"] == f"/api/v1/models/{model_id}/download"
    assert model["predict_url"] == f"/api/v1/models/{model_id}/predict"

    r = client.get("/api/v1/models/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_download_bundle(client: TestClient, trained_run: TrainedRun, tmp_path: Path) -> None:
    model_id = add_model(client, trained_run)
    r = client.get(f"/api/v1/models/{model_id}/download")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"].startswith("attachment;")
    assert f"lenet-{model_id}.zip" in r.headers["content-disposition"]
    assert r.headers["x-content-type-options"] == "nosniff"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert sorted(zf.namelist()) == sorted([MODEL_FILE, META_FILE, "report.json"])
        assert json.loads(zf.read(META_FILE))["class_names"] == ["blue", "green", "red"]
        assert "evaluation" in json.loads(zf.read("report.json"))
        zf.extractall(tmp_path / "bundle")
    # The unzipped bundle is a checkpoint folder the engine loads directly, and it answers like the service.
    predictor = Predictor.from_run(tmp_path / "bundle", device="cpu")
    image = make_image(COLOURS["red"], random.Random(1))
    expected = predictor.predict([image], top_k=3)[0]
    served = client.post(f"/api/v1/models/{model_id}/predict?top_k=3", files={"images": ("a.png", image)}).json()
    labels = served["predictions"][0]["labels"]
    assert [p["label"] for p in labels] == [p.label for p in expected]
    assert [p["probability"] for p in labels] == pytest.approx([p.probability for p in expected], abs=1e-5)
    # Nothing of the download is left behind in the data folder's temp space.
    app: Any = client.app
    assert not any((app.state.storage.root / "tmp").glob("download-*"))


def test_download_with_missing_files(client: TestClient, trained_run: TrainedRun) -> None:
    model_id = add_model(client, trained_run)
    shutil.rmtree(run_dir(client, model_id))
    r = client.get(f"/api/v1/models/{model_id}/download")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "model_unavailable"
    assert "/" not in r.json()["error"]["message"].replace("/api", "")  # no server paths in the message


def test_delete_model_without_job_removes_files(client: TestClient, trained_run: TrainedRun) -> None:
    model_id = add_model(client, trained_run, with_job=False)
    folder = run_dir(client, model_id)
    assert client.post(f"/api/v1/models/{model_id}/predict", files={"images": ("a.png", _png())}).status_code == 200
    app: Any = client.app
    assert model_id in app.state.model_cache

    r = client.delete(f"/api/v1/models/{model_id}")
    assert r.status_code == 204
    assert not folder.exists()
    assert model_id not in app.state.model_cache
    assert client.get(f"/api/v1/models/{model_id}").status_code == 404
    assert client.delete(f"/api/v1/models/{model_id}").status_code == 404
    assert client.post(f"/api/v1/models/{model_id}/predict", files={"images": ("a.png", _png())}).status_code == 404
    assert client.get("/api/v1/models").json() == []


def test_delete_model_keeps_files_while_its_job_exists(client: TestClient, trained_run: TrainedRun) -> None:
    model_id = add_model(client, trained_run)
    folder = run_dir(client, model_id)
    job_id = client.get(f"/api/v1/models/{model_id}").json()["job_id"]

    assert client.delete(f"/api/v1/models/{model_id}").status_code == 204
    assert client.get(f"/api/v1/models/{model_id}").status_code == 404
    assert folder.exists()  # the job still points at its run folder
    assert client.get(f"/api/v1/jobs/{job_id}").json()["model_id"] is None

    # Deleting the job now removes the folder: no model uses it any more.
    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    assert not folder.exists()


def test_deleting_the_job_keeps_the_model(client: TestClient, trained_run: TrainedRun) -> None:
    model_id = add_model(client, trained_run)
    job_id = client.get(f"/api/v1/models/{model_id}").json()["job_id"]
    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 204
    model = client.get(f"/api/v1/models/{model_id}").json()
    assert model["job_id"] is None
    assert client.post(f"/api/v1/models/{model_id}/predict", files={"images": ("a.png", _png())}).status_code == 200
    folder = run_dir(client, model_id)
    assert client.delete(f"/api/v1/models/{model_id}").status_code == 204
    assert not folder.exists()  # no job points at it any more


def test_other_owners_models_are_not_found(client: TestClient, trained_run: TrainedRun) -> None:
    other = other_user(client)
    theirs = add_model(client, trained_run, owner_id=other, name="theirs")
    mine = add_model(client, trained_run, name="mine")
    assert [m["id"] for m in client.get("/api/v1/models").json()] == [mine]
    for method, path in [
        ("GET", f"/api/v1/models/{theirs}"),
        ("GET", f"/api/v1/models/{theirs}/download"),
        ("DELETE", f"/api/v1/models/{theirs}"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    r = client.post(f"/api/v1/models/{theirs}/predict", files={"images": ("a.png", _png())})
    assert r.status_code == 404
    assert run_dir(client, theirs).exists()


def _png() -> bytes:
    return make_image(COLOURS["green"], random.Random(7))
