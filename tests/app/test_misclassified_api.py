"""The misclassified gallery: exactly the test images the model got wrong, grouped by confusion, one
confusion-matrix cell at a time, with thumbnails found through the run's own report (never a request path)."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.db.tables import Model, new_id
from finetune.config import TrainConfig
from finetune.predict import Predictor
from tests.app.conftest import assert_error, dataset_files, user_id_of
from tests.app.test_models_api import other_user


@dataclass(frozen=True)
class WeakRun:
    root: Path  # holds datasets/ and runs/ as the service lays them out
    job_id: str
    classes: list[str]
    evaluation: dict[str, Any]


@pytest.fixture(scope="session")
def weak_run(tmp_path_factory: pytest.TempPathFactory) -> WeakRun:
    """A model trained briefly at a low rate (many test images wrong), in the service's folder layout."""
    from finetune.train import train

    root = tmp_path_factory.mktemp("weak-service")
    data = root / "datasets" / "ds" / "images"
    for rel, content in dataset_files(per_class=20, seed=5).items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(content)
    job_id = new_id()
    config = TrainConfig(
        model="lenet",
        weights="none",
        strategy="full",
        epochs=1,
        lr=1e-4,
        batch_size=8,
        test_fraction=0.3,
        data=str(data),
        out=str(root / "runs" / job_id),
        cache_dir=str(root / "cache"),
        device="cpu",
        seed=2,
    )
    result = train(config)
    classes = json.loads((root / "runs" / job_id / "best" / "meta.json").read_text())["class_names"]
    return WeakRun(root, job_id, classes, result.evaluation)


def add_weak_model(client: TestClient, run: WeakRun, owner_id: str | None = None) -> str:
    app: Any = client.app
    storage = app.state.storage
    shutil.copytree(run.root / "datasets", storage.root / "datasets", dirs_exist_ok=True)
    key = storage.run_key(run.job_id)
    if not storage.path(key).exists():
        shutil.copytree(run.root / "runs" / run.job_id, storage.path(key), symlinks=True)
    with app.state.sessions.begin() as s:
        model = Model(
            owner_id=owner_id or user_id_of(client),
            job_id=None,
            name="weak",
            arch="lenet",
            num_classes=len(run.classes),
            classes=run.classes,
            evaluation=run.evaluation,
            config={},
            run_key=key,
            size_bytes=storage.size(key),
        )
        s.add(model)
        s.flush()
        return model.id


def expected_wrong(client: TestClient, run: WeakRun) -> set[tuple[str, str, str]]:
    """(path, true class, predicted class) of every test image the model gets wrong, predicted afresh."""
    app: Any = client.app
    run_dir = Path(app.state.storage.path(app.state.storage.run_key(run.job_id)))
    report = json.loads((run_dir / "dataset.json").read_text())
    root = run_dir / report["root_from_run"]
    predictor = Predictor.from_run(run_dir, device="cpu")
    wrong = set()
    for f in report["files"]:
        if f["split"] != "test":
            continue
        (top,) = predictor.predict([root / f["path"]], top_k=1)[0]
        if top.label != f["class"]:
            wrong.add((f["path"], f["class"], top.label))
    return wrong


def test_the_gallery_lists_exactly_the_misclassified_test_images(client: TestClient, weak_run: WeakRun) -> None:
    model_id = add_weak_model(client, weak_run)
    body = client.get(f"/api/v1/models/{model_id}/misclassified?limit=500").json()
    listed = {(i["path"], g["true"], g["predicted"]) for g in body["confusions"] for i in g["items"]}
    expected = expected_wrong(client, weak_run)
    assert expected and listed == expected
    assert body["available"] and body["total"] == body["recorded"] == len(expected)
    counts = [g["count"] for g in body["confusions"]]
    assert counts == sorted(counts, reverse=True) and sum(counts) == len(expected)
    # The confusion matrix says the same.
    matrix = weak_run.evaluation["test"]["confusion_matrix"]
    for g in body["confusions"]:
        assert matrix[g["true_index"]][g["predicted_index"]] == g["count"]

    # One cell: that confusion's images only.
    first = body["confusions"][0]
    cell = client.get(
        f"/api/v1/models/{model_id}/misclassified?true={first['true_index']}&predicted={first['predicted_index']}"
    ).json()
    assert [(g["true"], g["predicted"], g["count"]) for g in cell["confusions"]] == [
        (first["true"], first["predicted"], first["count"])
    ]
    probabilities = [i["probability"] for i in cell["confusions"][0]["items"]]
    assert probabilities == sorted(probabilities, reverse=True)

    # Thumbnails: by the item's index, a JPEG of the listed file.
    item = first["items"][0]
    r = client.get(item["thumbnail_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).format == "JPEG"
    assert_error(client.get(f"/api/v1/models/{model_id}/misclassified/{body['recorded']}/thumbnail"), 404)
    assert_error(client.get(f"/api/v1/models/{model_id}/misclassified/-1/thumbnail"), 404)

    # The page: a gallery section, and clickable off-diagonal cells of the test confusion matrix.
    page = client.get(f"/models/{model_id}?split=test").text
    assert 'id="misclassified"' in page
    assert f'data-true="{first["true_index"]}" data-predicted="{first["predicted_index"]}"' in page


def test_another_users_gallery_is_not_found(client: TestClient, weak_run: WeakRun) -> None:
    theirs = add_weak_model(client, weak_run, owner_id=other_user(client))
    assert_error(client.get(f"/api/v1/models/{theirs}/misclassified"), 404, "not_found")
    assert_error(client.get(f"/api/v1/models/{theirs}/misclassified/0/thumbnail"), 404, "not_found")
