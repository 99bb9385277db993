"""The whole flow in a real browser: Debian's Chromium, driven by Playwright, against the real service
(``python -m app.cli serve``: the API and a worker, on SQLite). Upload a folder through the form, start a
job, watch the charts gain points live, open the model and get a prediction from the predict box. And a
job whose process is killed, resumed from its page: the page then shows only the resumed attempt's epochs."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.db.migrate import upgrade
from app.settings import Settings
from tests.app.conftest import dataset_files, job_processes, make_image, settings_env, zip_bytes

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
REPO = Path(__file__).resolve().parents[2]
EPOCHS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``app.cli serve`` on a free port with its own SQLite settings; yields the base URL and the one-time
    login link it prints at first start."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'service.db'}",
        queue_backend="sqlite",
        heartbeat_seconds=0.5,
        progress_interval_seconds=0.1,
        cancel_grace_seconds=10,
        worker_slots=1,
        weights_dir=tmp_path / "weights",
    )
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.db_url)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "service.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        env=settings_env(settings),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its worker and job processes share the group: all stopped together
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the service did not start:\n{(tmp_path / 'service.log').read_text()[-3000:]}")
            time.sleep(0.2)
        log.flush()
        match = re.search(r"http://\S+/login\?token=\S+", (tmp_path / "service.log").read_text())
        assert match, "serve did not print a first-start login link"
        yield base, match.group(0)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's Chromium is not installed (make browser-deps)")
@pytest.mark.timeout(150)
def test_upload_train_watch_and_predict_in_the_browser(service: tuple[str, str], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, login_link = service

    # A folder of class folders, as a user would pick it.
    folder = tmp_path / "shapes"
    for rel, data in dataset_files(per_class=16, seed=3).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)

    problems: list[str] = []
    failed: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            # Failed responses are checked one by one below; any other console error is a problem.
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console: {m.text}")
                    if m.type == "error" and not m.text.startswith("Failed to load resource")
                    else None
                ),
            )
            page.on(
                "response",
                lambda r: failed.append(f"{r.request.method} {r.status} {r.url}") if r.status >= 400 else None,
            )
            page.on(
                "request",
                lambda r: None if r.url.startswith((base, "data:", "blob:")) else problems.append(f"request {r.url}"),
            )

            # 0. Pages need a login: the first-start link logs the admin in once, then it is spent.
            page.goto(base + "/datasets/new")
            page.wait_for_url(re.compile(r"/login\?next="))
            page.goto(login_link.replace("/login?", "/login?next=%2Fdatasets%2Fnew&"))
            page.wait_for_url(re.compile(r"/datasets/new$"))

            # 1. Upload the folder through the form; the report opens with thumbnails per class.
            page.set_input_files("#folder", str(folder))
            expect(page.locator("#folder-summary")).to_contain_text("48 files")
            expect(page.locator("#class-preview li")).to_have_count(3)
            page.fill("#name", "shapes <b>&</b>")
            page.click("#upload-submit")
            page.wait_for_url(re.compile(r"/datasets/[0-9a-f]{32}$"))
            expect(page.locator("h1")).to_have_text("shapes <b>&</b>")
            expect(page.locator("#counts tbody tr")).to_have_count(3)
            thumbs = page.locator("#thumbnails img")
            expect(thumbs).to_have_count(12)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#thumbnails img')].every(i => i.naturalWidth > 0)"
            )

            # 2. New job: weights availability, a 422 shown next to its field, then a real start.
            page.click("text=Train a model on it")
            page.wait_for_url(re.compile(r"/jobs/new\?dataset=[0-9a-f]{32}$"))
            page.check("input[name=model][value=resnet18]")
            expect(page.locator("#weights-imagenet")).to_be_disabled()  # no weights in this test's folder
            expect(page.locator("#weights-command")).to_have_text("finetune weights fetch resnet18")
            page.check("input[name=model][value=lenet]")
            expect(page.locator("#weights-none")).to_be_checked()
            page.fill("#hp-epochs", "0")
            page.click("#job-submit")
            expect(page.locator('[data-error-for="epochs"]')).to_contain_text("greater than or equal to 1")
            expect(page.locator("#job-error")).to_be_visible()
            assert failed == [f"POST 422 {base}/api/v1/jobs"]
            failed.clear()
            page.fill("#hp-epochs", str(EPOCHS))
            page.fill("#hp-batch_size", "16")
            page.fill("#hp-image_size", "32")
            page.click("#job-submit")
            page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))

            # 3. The charts gain points from the event stream, without a reload.
            page.evaluate("() => { window.notReloaded = true; }")
            chart_len = "(id) => Chart.getChart(id).data.datasets[1].data.length"
            first = page.evaluate(chart_len, "loss-chart")
            page.wait_for_function(f"n => ({chart_len})('loss-chart') > n", arg=first, timeout=60_000)
            page.wait_for_function(f"n => ({chart_len})('acc-chart') >= n", arg=EPOCHS, timeout=60_000)
            assert first < EPOCHS
            expect(page.locator("#metrics-table tbody tr")).to_have_count(EPOCHS)
            expect(page.locator("#job-badge .badge")).to_have_text("Succeeded", timeout=30_000)
            expect(page.locator("#job-percent")).to_have_text("100%")
            expect(page.locator("#cancel-button")).to_be_hidden()
            assert page.evaluate("() => window.notReloaded === true")

            # 4. The model page: metrics, confusion matrix, and a prediction from the predict box.
            page.click("#model-link")
            page.wait_for_url(re.compile(r"/models/[0-9a-f]{32}$"))
            expect(page.locator("#per-class tbody tr")).to_have_count(3)
            expect(page.locator(".confusion tbody tr")).to_have_count(3)
            red = make_image((220, 30, 30), random.Random(99))
            page.set_input_files("#predict-input", files=[{"name": "red.png", "mimeType": "image/png", "buffer": red}])
            bars = page.locator(".prediction .label-bar")
            expect(bars).to_have_count(3, timeout=30_000)
            labels = bars.locator(".name").all_text_contents()
            assert sorted(labels) == ["blue", "green", "red"]
            probs = [float(t.rstrip("%")) for t in bars.locator(".prob").all_text_contents()]
            assert probs == sorted(probs, reverse=True) and 99 <= sum(probs) <= 101
            expect(page.locator(".prediction img")).to_have_attribute("alt", "red.png")
            expect(page.locator("#predict-error")).to_be_hidden()
            expect(page.locator(".prediction .answer")).to_have_count(1)

            # 5. Calibration charts, the misclassified gallery, and a Grad-CAM heat map over the image.
            assert page.evaluate("() => !!Chart.getChart('reliability-chart') && !!Chart.getChart('coverage-chart')")
            expect(page.locator("#gallery-summary")).not_to_have_text("Loading…")
            page.check("#explain-input")
            page.set_input_files("#predict-input", files=[{"name": "red.png", "mimeType": "image/png", "buffer": red}])
            expect(page.locator(".prediction canvas.gradcam")).to_have_count(1, timeout=30_000)
            expect(page.locator("#predict-error")).to_be_hidden()
        finally:
            browser.close()
    assert not problems, problems
    assert not failed, failed


def api_key(log: Path) -> str:
    """The admin's API key, which serve prints once at first start."""
    match = re.search(r"\b(ft_\S+)", log.read_text())
    assert match, "serve did not print an API key at first start"
    return match.group(1)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's Chromium is not installed (make browser-deps)")
@pytest.mark.timeout(150)
def test_a_resumed_job_page_shows_only_the_resumed_attempts_epochs(service: tuple[str, str], tmp_path: Path) -> None:
    """A two-stage job is killed in its head stage (its checkpoint is written when the stage ends), so its
    automatic retry starts over. The page showed the dead attempt's epochs; once the retried job has
    finished, its table and charts hold exactly the job's history, every epoch from attempt 2."""
    from playwright.sync_api import expect, sync_playwright

    base, login_link = service
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key(tmp_path / 'service.log')}"})
    r = api.post(
        "/api/v1/datasets", files={"archive": ("d.zip", zip_bytes(dataset_files(per_class=10)))}, data={"name": "d"}
    )
    assert r.status_code == 201, r.text
    settings = {"model": "lenet", "weights": "none", "image_size": 32, "batch_size": 8, "epochs": 1}
    r = api.post(
        "/api/v1/jobs", json={"dataset_id": r.json()["id"], **settings, "strategy": "two-stage", "head_epochs": 200}
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(login_link.replace("/login?", f"/login?next=%2Fjobs%2F{job_id}&"))
            page.wait_for_url(re.compile(f"/jobs/{job_id}$"))

            # Killed as soon as its first epoch is shown: well inside its 200-epoch head stage. The worker
            # retries it (as after the OOM killer) from the start: the head stage had no checkpoint yet.
            expect(page.locator("#metrics-table tbody tr").first).to_be_visible(timeout=90_000)
            shown_before = page.evaluate("() => [...window.jobPage.metrics.values()].map((m) => m.attempt)")
            assert shown_before and set(shown_before) == {1}
            (pid,) = job_processes(job_id)
            os.kill(pid, signal.SIGKILL)
            expect(page.locator("#job-badge .badge")).to_have_text("Succeeded", timeout=120_000)
            done = api.get(f"/api/v1/jobs/{job_id}").json()
            assert done["attempt"] == 2 and {m["attempt"] for m in done["metrics"]} == {2}
            epochs = [m["epoch"] for m in done["metrics"]]
            assert epochs == list(range(1, 202))
            shown = page.evaluate("() => [...window.jobPage.metrics.values()].sort((a, b) => a.epoch - b.epoch)")
            assert shown == done["metrics"]
            chart = "(id) => { const c = Chart.getChart(id); return [c.data.labels, ...c.data.datasets.map((d) => d.data)]; }"
            assert page.evaluate(chart, "loss-chart") == [
                epochs,
                [m["train_loss"] for m in done["metrics"]],
                [m["val_loss"] for m in done["metrics"]],
            ]
            assert page.evaluate(chart, "acc-chart")[0] == epochs
            expect(page.locator("#metrics-table tbody tr")).to_have_count(len(epochs))
            expect(page.locator("#metrics-table .best")).to_have_count(1)
        finally:
            browser.close()
            api.close()
    assert not problems, problems
