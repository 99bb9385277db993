"""Fixtures for the service tests: settings on a temporary data folder, migrated databases (SQLite and
the PostgreSQL server on 127.0.0.1:5432), an app client, generated datasets, and a real worker process."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from sqlalchemy import create_engine, text

from app.db.migrate import upgrade
from app.main import create_app
from app.settings import Settings

PG_ADMIN_URL = os.environ.get("FINETUNE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin URL of the local PostgreSQL server (started by .ci/run)."""
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # pragma: no cover - the CI script starts the server
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {e}")
    return PG_ADMIN_URL


def fresh_pg_database(admin_url: str) -> tuple[str, str]:
    """Create an empty database for one test; returns (url, name)."""
    name = f"ft_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}", name


def drop_pg_database(admin_url: str, name: str) -> None:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database URL: SQLite in the test's folder, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'service.db'}"
        upgrade(url)
        yield url
        return
    admin = request.getfixturevalue("pg_server")
    url, name = fresh_pg_database(admin)
    try:
        upgrade(url)
        yield url
    finally:
        from app.db import engine_for

        engine_for(url).dispose()
        drop_pg_database(admin, name)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        queue_backend="sqlite",
        heartbeat_seconds=0.5,
        progress_interval_seconds=0.1,
        cancel_grace_seconds=10,
        worker_slots=1,
        weights_dir=tmp_path / "weights",
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a subprocess read the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"FINETUNE_{name.upper()}"] = str(value)
    return env


@pytest.fixture
def worker(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process (``python -m app.cli worker``) on the test's settings."""
    log = open(settings.data_dir.parent / "worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=settings_env(settings),
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def make_image(colour: tuple[int, int, int], rng: random.Random, size: int = 40, fmt: str = "PNG") -> bytes:
    """A coloured disc on a random background: easy to learn, different every time."""
    background = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (size + rng.randint(0, 8), size), background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    x, y = rng.randint(0, size // 3), rng.randint(0, size // 3)
    draw.ellipse([x, y, x + size // 2, y + size // 2], fill=colour)
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def dataset_files(per_class: int = 12, seed: int = 0, classes: dict[str, tuple[int, int, int]] | None = None
                  ) -> dict[str, bytes]:
    """{relative path: image bytes} for a small class-folder dataset."""
    rng = random.Random(seed)
    return {f"{name}/{i}.png": make_image(colour, rng) for name, colour in (classes or COLOURS).items()
            for i in range(per_class)}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


def upload_zip(client: TestClient, files: dict[str, bytes] | None = None, name: str = "shapes") -> dict:
    r = client.post("/api/v1/datasets", files={"archive": ("data.zip", zip_bytes(files or dataset_files()))},
                    data={"name": name})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def wait_for_job(client: TestClient, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout}s; last: {job}")
