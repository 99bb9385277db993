"""Fixtures for the service tests: settings on a temporary data folder, migrated databases (SQLite and
the PostgreSQL server on 127.0.0.1:5432), an app client, generated datasets, and a real worker process."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from sqlalchemy import create_engine, text

from app.db import session_scope
from app.db.migrate import upgrade
from app.main import create_app
from app.services import auth
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


@dataclass(frozen=True)
class Account:
    user_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_account(settings: Settings, name: str | None = None, *, admin: bool = False) -> Account:
    """A user with an API key, straight in the database (what `app.cli users create` does)."""
    with session_scope(settings.db_url) as s:
        user = auth.create_user(s, name or f"user-{uuid.uuid4().hex[:8]}", admin=admin)
        key = auth.issue_key(s, user, "tests").key
        return Account(user.id, key)


@pytest.fixture
def admin(settings: Settings) -> Account:
    """The first user: an admin, as the serve command creates at first start."""
    return make_account(settings, "admin", admin=True)


def authed_client(app: Any, account: Account) -> TestClient:
    return TestClient(app, headers=account.headers)


@pytest.fixture
def client(settings: Settings, admin: Account) -> Iterator[TestClient]:
    """A client authenticated with the admin's API key."""
    with authed_client(create_app(settings), admin) as c:
        yield c


def user_id_of(client: TestClient) -> str:
    """The id of the user whose key ``client`` sends."""
    key = client.headers["authorization"].split(" ", 1)[1]
    with session_scope(client.app.state.settings.db_url) as s:  # type: ignore[attr-defined]
        found = auth.user_for_key(s, key)
        assert found is not None
        return found[0].id


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a subprocess read the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"FINETUNE_{name.upper()}"] = str(value)
    return env


# ``python -m app.cli worker`` that gets SIGTERM when the test process dies (a run killed by a timeout or ^C
# leaves no worker behind polling its queue).
WORKER_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys; ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); "
    "os.execv(sys.executable, [sys.executable, '-m', 'app.cli', 'worker'])"
)


@pytest.fixture
def start_worker(settings: Settings) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Starts real worker processes (``python -m app.cli worker``) on the test's settings; each call starts
    one more (a restart after a crash). All are stopped at the end; logs go to worker.log, worker-2.log..."""
    started: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start() -> subprocess.Popen[bytes]:
        n = len(started) + 1
        log = open(settings.data_dir.parent / ("worker.log" if n == 1 else f"worker-{n}.log"), "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_WITH_PDEATHSIG, str(os.getpid())],
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        started.append((proc, log))
        return proc

    try:
        yield start
    finally:
        for proc, log in started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()


@pytest.fixture
def worker(start_worker: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A real worker process (``python -m app.cli worker``) on the test's settings."""
    return start_worker()


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


def dataset_files(
    per_class: int = 12, seed: int = 0, classes: dict[str, tuple[int, int, int]] | None = None
) -> dict[str, bytes]:
    """{relative path: image bytes} for a small class-folder dataset."""
    rng = random.Random(seed)
    return {
        f"{name}/{i}.png": make_image(colour, rng)
        for name, colour in (classes or COLOURS).items()
        for i in range(per_class)
    }


def zip_bytes(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


def upload_zip(client: TestClient, files: dict[str, bytes] | None = None, name: str = "shapes") -> dict:
    r = client.post(
        "/api/v1/datasets", files={"archive": ("data.zip", zip_bytes(files or dataset_files()))}, data={"name": name}
    )
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


# A worker-based test runs on SQLite only: the queue, the worker and the job processes are the same code on
# PostgreSQL, and training twice would double the suite's time (the smoke flow covers PostgreSQL).
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_processes(job_id: str) -> list[int]:
    """Live (not zombie) ``app.jobs.child`` processes of a job, found in /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"app.jobs.child" in argv and job_id.encode() in argv and state != "Z":
            pids.append(int(entry.name))
    return pids


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is ``status`` with the one error shape; returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert set(error) <= {"code", "message", "details"}, body
    if code is not None:
        assert error["code"] == code, body
    return error  # type: ignore[no-any-return]


def stored_files(settings: Settings) -> list[str]:
    """Everything under the data folder's datasets/ and tmp/ (what a rejected upload must not leave)."""
    return sorted(
        str(p.relative_to(settings.data_dir))
        for top in ("datasets", "tmp")
        if (settings.data_dir / top).exists()
        for p in (settings.data_dir / top).rglob("*")
    )


def count_rows(settings: Settings, table: str) -> int:
    from app.db import engine_for

    with engine_for(settings.db_url).connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def iter_events(response: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) for each Server-Sent Event of a streamed response, as it arrives (comments dropped)."""
    event, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data += line[len("data: ") :]
        elif line == "" and data:
            yield event, json.loads(data)
            event, data = "message", ""


def read_events(client: TestClient, job_id: str, timeout: float = 120) -> list[tuple[str, dict[str, Any]]]:
    """Read ``GET /jobs/{id}/events`` to its end: [(event, data), ...] (comments such as keep-alives dropped)."""
    events: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for event in iter_events(r):
            events.append(event)
            assert time.monotonic() < deadline, f"the event stream did not end within {timeout}s: {events[-3:]}"
    return events


def metrics_held(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The epochs a client of the event stream holds after ``events``, as the job page keeps them: a ``reset``
    replaces them all, a ``metric`` adds one."""
    held: dict[int, dict[str, Any]] = {}
    for kind, data in events:
        if kind == "reset":
            held = {m["epoch"]: m for m in data["metrics"]}
        elif kind == "metric":
            held[data["epoch"]] = data
    return [held[epoch] for epoch in sorted(held)]
