"""The server-rendered pages: each renders with its content, unknown ids are 404, user text is escaped,
the chart library comes from node_modules, and nothing is loaded from another origin."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.db.tables import Job, JobMetric, Model, utcnow
from app.pages.routes import CHART_JS, CHART_JS_URL, STATIC_DIR
from app.settings import Settings
from finetune import weights as engine_weights
from tests.app.conftest import dataset_files, upload_zip, user_id_of

XSS_NAME = "<script>alert('name')</script>"
XSS_CLASS = "<img src=x onerror=alert(1)>"
EXTERNAL_URL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}""", re.IGNORECASE)


def add_model(client: TestClient, job_id: str | None, classes: list[str]) -> str:
    """A Model row as a finished job leaves it (the files are not needed to render the page)."""

    def split(count: int, top1: float) -> dict[str, Any]:
        n = len(classes)
        confusion = [[(count // n if i == j else 1) for j in range(n)] for i in range(n)]
        per_class = [
            {"class": c, "precision": 0.9, "recall": 0.8 - 0.4 * i, "f1": 0.85 - 0.45 * i, "support": count // n}
            for i, c in enumerate(classes)
        ]
        return {
            "count": count,
            "loss": 0.31,
            "top1": top1,
            "macro_f1": 0.77,
            "per_class": per_class,
            "confusion_matrix": confusion,
        }

    with client.app.state.sessions.begin() as s:  # type: ignore[attr-defined]
        model = Model(
            owner_id=user_id_of(client),
            job_id=job_id,
            name=f"{XSS_NAME} model",  # type: ignore[attr-defined]
            arch="lenet",
            num_classes=len(classes),
            classes=classes,
            evaluation={"checkpoint": "best", "epoch": 3, "val": split(6, 0.833), "test": split(9, 0.889)},
            config={"model": "lenet", "weights": "none", "epochs": 3, "lr": None, "batch_size": 32},
            run_key="runs/none",
            size_bytes=123456,
        )
        s.add(model)
        s.flush()
        return model.id


@pytest.fixture
def world(client: TestClient) -> dict[str, Any]:
    """A dataset whose name and one class name are hostile HTML, a queued job on it, and a model."""
    classes = {"red": (220, 30, 30), XSS_CLASS: (30, 40, 220)}
    dataset = upload_zip(client, dataset_files(per_class=6, classes=classes), name=XSS_NAME)
    r = client.post(
        "/api/v1/jobs", json={"dataset_id": dataset["id"], "model": "lenet", "weights": "none", "epochs": 3}
    )
    assert r.status_code == 202, r.text
    job = r.json()
    model_id = add_model(client, None, sorted(classes))
    return {"dataset": dataset, "job": job, "model_id": model_id}


def page(client: TestClient, path: str, status: int = 200) -> str:
    r = client.get(path)
    assert r.status_code == status, (path, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    return r.text


def assert_escaped(html: str) -> None:
    assert "<script>alert" not in html
    assert "<img src=x" not in html


def test_home_without_anything_explains_the_first_steps(client: TestClient) -> None:
    html = page(client, "/")
    assert "Get started" in html
    assert 'href="/datasets/new"' in html and 'href="/jobs/new"' in html
    assert "No datasets yet" in html and "No jobs yet" in html and "No models yet" in html


def test_home_lists_datasets_jobs_and_models(client: TestClient, world: dict[str, Any]) -> None:
    html = page(client, "/")
    assert f'href="/datasets/{world["dataset"]["id"]}"' in html
    assert f'href="/jobs/{world["job"]["id"]}"' in html
    assert f'href="/models/{world["model_id"]}"' in html
    assert 'class="badge badge-queued"' in html
    assert "88.9%" in html  # the model's test accuracy
    assert "&lt;script&gt;alert(&#39;name&#39;)&lt;/script&gt;" in html
    assert_escaped(html)


def test_upload_page_has_zip_and_folder_inputs(client: TestClient) -> None:
    html = page(client, "/datasets/new")
    assert re.search(r'<input id="folder"[^>]*type="file"[^>]*webkitdirectory[^>]*multiple', html)
    assert re.search(r'<input id="archive"[^>]*type="file"[^>]*accept="\.zip', html)
    assert 'id="name"' in html and "/static/dataset_new.js" in html


def test_dataset_page_shows_the_report_and_thumbnails(client: TestClient, world: dict[str, Any]) -> None:
    dataset = world["dataset"]
    html = page(client, f"/datasets/{dataset['id']}")
    assert "Images per class" in html and "Skipped files" in html and "Duplicates" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    counts = dataset["report"]["counts"]["red"]
    assert f'<td class="num">{counts["train"]}</td>' in html
    for url in dataset["thumbnails"]["red"]:
        assert f'src="{url}"' in html
    assert f'href="/jobs/new?dataset={dataset["id"]}"' in html
    assert f'href="/jobs/{world["job"]["id"]}"' in html  # the jobs on this dataset
    assert_escaped(html)
    assert client.get(dataset["thumbnails"]["red"][0]).headers["content-type"] == "image/jpeg"


def test_dataset_page_lists_skipped_files_with_reasons(client: TestClient) -> None:
    files = dataset_files(per_class=5)
    files["red/broken.png"] = b"not an image at all"
    dataset = upload_zip(client, files, name="with a broken file")
    html = page(client, f"/datasets/{dataset['id']}")
    skipped = dataset["report"]["skipped"]
    assert [s["path"] for s in skipped] == ["red/broken.png"]
    assert "red/broken.png" in html and skipped[0]["reason"].split(":")[0] in html


def test_new_job_form_shows_architectures_weights_and_hyperparameters(
    client: TestClient, settings: Settings, world: dict[str, Any]
) -> None:
    # resnet18's ImageNet file is present (status is checked without hashing), the others are not.
    present = engine_weights.weights_file("resnet18", settings.weights_dir)
    present.path.parent.mkdir(parents=True, exist_ok=True)
    present.path.write_bytes(b"weights")
    html = page(client, f"/jobs/new?dataset={world['dataset']['id']}")
    assert re.search(rf'<option value="{world["dataset"]["id"]}" selected>', html)
    arch = re.search(r'<label class="arch" data-arch="resnet18">.*?</label>', html, re.S)
    assert arch and 'data-present="1"' in arch.group(0) and "ImageNet weights ready" in arch.group(0)
    arch = re.search(r'<label class="arch" data-arch="resnet50">.*?</label>', html, re.S)
    assert arch and 'data-present="0"' in arch.group(0) and "ImageNet weights missing" in arch.group(0)
    assert 'data-fetch="finetune weights fetch resnet50"' in arch.group(0)
    assert re.search(r'<label class="arch" data-arch="lenet">.*?random init only', html, re.S)
    assert 'value="imagenet"' in html and 'value="none"' in html
    for strategy in ("auto", "frozen", "full", "two-stage"):
        assert f'<option value="{strategy}"' in html
    # defaults, ranges and help come from the engine's own table
    assert re.search(r'id="hp-epochs"[^>]*placeholder="auto"[^>]*min="1"[^>]*max="1000"[^>]*value=""', html, re.S)
    assert re.search(r'id="hp-batch_size"[^>]*value="32"', html, re.S)
    # empty: the default rate; "auto": the range test picks it
    assert re.search(r'id="hp-lr"[^>]*data-type="rate"[^>]*placeholder="default, or auto"', html, re.S)
    assert re.search(r'id="hp-label_smoothing"[^>]*placeholder="auto"', html, re.S)  # chosen from the data
    assert '<option value="adamw" selected>' in html and '<option value="cosine" selected>' in html
    assert "learning-rate schedule: cosine with warmup" in html
    assert 'id="hp-device"' not in html  # a server-owned setting is never offered
    assert_escaped(html)


def test_new_job_without_datasets_points_to_the_upload(client: TestClient) -> None:
    html = page(client, "/jobs/new")
    assert "You need a dataset first" in html and 'href="/datasets/new"' in html


def test_job_page_for_a_queued_job(client: TestClient, world: dict[str, Any]) -> None:
    html = page(client, f"/jobs/{world['job']['id']}")
    assert 'class="badge badge-queued"' in html
    assert re.search(r'<button type="button" id="cancel-button" class="danger">', html)  # not hidden
    assert re.search(r'<button type="button" id="resume-button" hidden>', html)
    assert 'id="loss-chart"' in html and 'id="acc-chart"' in html
    assert f'<script src="{CHART_JS_URL}" defer></script>' in html
    assert "/static/job.js" in html and 'id="job-data"' in html
    assert "Metrics appear here after each epoch" in html
    assert re.search(r'<p class="small muted" id="job-retries" hidden>', html)  # never retried: nothing said
    assert_escaped(html)


def test_job_page_says_when_a_job_was_retried(client: TestClient, world: dict[str, Any]) -> None:
    job_id = world["job"]["id"]
    with client.app.state.sessions.begin() as s:  # type: ignore[attr-defined]
        job = s.get(Job, job_id)
        job.retries, job.retry_reason = 1, "the training process was <killed> by the system (out of memory?)"
    html = page(client, f"/jobs/{job_id}")
    assert re.search(r'<p class="small muted" id="job-retries">Retried automatically 1 time', html)
    assert "the training process was &lt;killed&gt; by the system (out of memory?)" in html


def test_job_page_for_a_failed_job_with_metrics(client: TestClient, world: dict[str, Any]) -> None:
    job_id = world["job"]["id"]
    with client.app.state.sessions.begin() as s:  # type: ignore[attr-defined]
        job = s.get(Job, job_id)
        job.status, job.error, job.finished_at, job.epoch, job.total_epochs = "failed", "<b>boom</b>", utcnow(), 2, 3
        for epoch in (1, 2):
            s.add(
                JobMetric(
                    job_id=job_id,
                    attempt=1,
                    epoch=epoch,
                    stage="finetune",
                    train_loss=1.0 / epoch,
                    train_acc=0.5 + epoch / 10,
                    val_loss=1.2 / epoch,
                    val_acc=0.4 + epoch / 10,
                    lr=1e-3,
                    images_per_sec=100.0,
                    epoch_time=1.5,
                    is_best=epoch == 2,
                )
            )
    html = page(client, f"/jobs/{job_id}")
    assert 'class="badge badge-failed"' in html
    assert "&lt;b&gt;boom&lt;/b&gt;" in html and "<b>boom</b>" not in html.split('id="job-data"')[0]
    assert re.search(r'<button type="button" id="cancel-button" class="danger" hidden>', html)
    assert re.search(r'<button type="button" id="resume-button">', html)
    assert html.count("<tr data-epoch=") == 2 and "70.0%" in html
    data = re.search(r'<script type="application/json" id="job-data">(.*?)</script>', html, re.S)
    assert data and '"val_acc": 0.6' in data.group(1) and "<b>" not in data.group(1)  # tojson escapes <


def test_model_page_shows_metrics_confusion_matrix_and_predict_box(client: TestClient, world: dict[str, Any]) -> None:
    model_id = world["model_id"]
    html = page(client, f"/models/{model_id}")
    assert "Test accuracy" in html and "88.9%" in html and "Validation accuracy" in html and "83.3%" in html
    assert "Per class · test set" in html
    assert html.count('<td class="num">90.0%</td>') == 2  # precision per class
    assert 'class="confusion"' in html and 'class="diag"' in html
    assert "background-color: rgba(37, 99, 235," in html
    assert f'href="/api/v1/models/{model_id}/download"' in html
    assert re.search(r'<input type="file" id="predict-input" name="images" accept="image/\*" multiple', html)
    assert 'data-top-k="2"' in html  # top-k never asks for more labels than the model has
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert_escaped(html)
    val = page(client, f"/models/{model_id}?split=val")
    assert "Per class · validation set" in val


@pytest.mark.parametrize("path", ["/datasets/{}", "/jobs/{}", "/models/{}"])
def test_unknown_ids_are_404(client: TestClient, path: str) -> None:
    html = page(client, path.format("0123456789abcdef0123456789abcdef"), 404)
    assert "Not found" in html and "0123456789abcdef0123456789abcdef" in html


def test_hostile_ids_in_the_url_are_escaped(client: TestClient) -> None:
    html = page(client, "/jobs/%3Cscript%3Ealert(1)%3C%5Cscript%3E", 404)
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html


def test_chart_library_is_served_from_node_modules(client: TestClient, settings: Settings) -> None:
    r = client.get(CHART_JS_URL)
    assert r.status_code == 200
    assert "javascript" in r.headers["content-type"]
    assert r.content == (settings.assets_dir / CHART_JS).read_bytes()
    assert b"Chart" in r.content[:5000]


def test_missing_chart_library_is_a_clear_404(tmp_path: Path, settings: Settings) -> None:
    settings = settings.model_copy(update={"assets_dir": tmp_path / "no-node-modules"})
    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        r = c.get(CHART_JS_URL)
    assert r.status_code == 404 and "make install" in r.json()["error"]["message"]


def test_static_files_are_served(client: TestClient) -> None:
    for name in ("app.css", "app.js", "home.js", "dataset_new.js", "job_new.js", "job.js", "model.js", "favicon.svg"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200, name
    assert client.get("/static/../settings.py").status_code == 404


def test_no_page_references_another_origin(client: TestClient, world: dict[str, Any]) -> None:
    paths = [
        "/",
        "/datasets/new",
        f"/datasets/{world['dataset']['id']}",
        "/jobs/new",
        f"/jobs/new?dataset={world['dataset']['id']}",
        f"/jobs/{world['job']['id']}",
        f"/models/{world['model_id']}",
        "/models/unknown",
    ]
    for path in paths:
        r = client.get(path)
        found = EXTERNAL_URL.findall(r.text)
        assert not found, (path, found)
        for src in re.findall(r'(?:src|href)="([^"]+)"', r.text):
            assert src.startswith(("/", "?", "#")), (path, src)
    for asset in sorted(STATIC_DIR.glob("*.js")) + sorted(STATIC_DIR.glob("*.css")):
        assert not EXTERNAL_URL.findall(asset.read_text()), asset.name
