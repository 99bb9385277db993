"""Property-based fuzzing of the whole API with schemathesis, from the app's own /openapi.json: valid and
invalid requests to every operation, as an admin, with zero 5xx answers allowed.

The app runs in this process (ASGI) on SQLite, seeded with a dataset, a queued job and a trained model; about
half the generated ids are swapped for those real ids (decided by a hash of the generated value, so the run
stays deterministic) so the fuzzer reaches past the 404s. Rows a fuzzed DELETE removes are put back before
the next request. Bounded: a fixed number of examples per operation, derandomized."""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.db.migrate import upgrade
from app.db.tables import Dataset, Job, Model
from app.main import create_app
from app.settings import Settings
from tests.app.conftest import Account, dataset_files, make_account, sqlite_only, upload_zip
from tests.app.test_models_api import TrainedRun, add_model, train_once

MAX_EXAMPLES = 20  # per operation, in the fuzzing phase
ID_PARAMETERS = ("dataset_id", "job_id", "model_id")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train_once(tmp_path_factory)


@dataclass
class Seeded:
    """The app under test and the rows the fuzzer aims at; ``ensure()`` puts back what a fuzzed DELETE removed."""

    app: FastAPI
    admin: Account
    run: TrainedRun
    ids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seeder = TestClient(self.app, headers=self.admin.headers)

    def ensure(self) -> dict[str, str]:
        with self.app.state.sessions() as s:
            exists = {
                "dataset_id": s.get(Dataset, self.ids.get("dataset_id", "")) is not None,
                "job_id": s.get(Job, self.ids.get("job_id", "")) is not None,
                "model_id": s.get(Model, self.ids.get("model_id", "")) is not None,
            }
        if not exists["dataset_id"]:
            self.ids["dataset_id"] = upload_zip(self.seeder, dataset_files(per_class=4), name="fuzz")["id"]
            exists["job_id"] = False  # a job on the new dataset
        if not exists["job_id"]:
            job = {"dataset_id": self.ids["dataset_id"], "model": "lenet", "weights": "none", "epochs": 1}
            r = self.seeder.post("/api/v1/jobs", json=job)
            assert r.status_code == 202, r.text
            self.ids["job_id"] = r.json()["id"]
        if not exists["model_id"]:
            self.ids["model_id"] = add_model(self.app, self.run, owner_id=self.admin.user_id)
        return self.ids


def fuzz_settings(data_dir: Path) -> Settings:
    # SQLite only. No rate limits or queue cap: the fuzzer (and the re-seeding) would spend them and then
    # see only 429s.
    return Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'service.db'}",
        queue_backend="sqlite",
        weights_dir=data_dir / "weights",
        rate_limit_predict_per_minute=0,
        rate_limit_uploads_per_hour=0,
        max_queued_jobs_per_user=0,
    )


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, trained_run: TrainedRun) -> Iterator[Seeded]:
    """One app for every operation (seeding per operation would cost more than fuzzing it)."""
    settings = fuzz_settings(tmp_path_factory.mktemp("fuzz") / "data")
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.db_url)
    world = Seeded(create_app(settings), make_account(settings, "admin", admin=True), trained_run)
    world.ensure()
    yield world
    world.seeder.close()
    asgi.shutdown_lifespans()  # the app's queue and model cache close now, not at interpreter exit


def openapi_document() -> dict[str, Any]:
    """The app's /openapi.json (it does not depend on the settings; the app is built in a scratch folder)."""
    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(fuzz_settings(Path(scratch)))
        try:
            return TestClient(app).get("/openapi.json").json()  # type: ignore[no-any-return]
        finally:
            app.state.queue.close()


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20240601,
        # generation speed is not what this test is about; on a loaded CI machine it must not fail it
        "suppress-health-check": ["too_slow"],
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        # examples (none in the schema), coverage (boundary and invalid values of every parameter, other
        # methods) and fuzzing; no stateful phase (the schema has no links)
        "phases": {"stateful": {"enabled": False}},
        # an event stream of a queued job never ends on its own: keep its first event
        "max-stream-events": 1,
        "request-timeout": 20,
    }
)
# Raw bodies the schema offers (a zip to upload, any image type to predict) go on the wire as bytes.
schemathesis.serializer.alias(["application/zip", "image/bmp", "image/jpg"], "application/octet-stream")
schema = schemathesis.openapi.from_dict(openapi_document(), config=CONFIG)


def aim(value: Any) -> bool:
    """Whether to swap a generated id for a real one: about half the time, the same way on every run."""
    return zlib.crc32(repr(value).encode()) % 2 == 0


@schema.parametrize()
def test_no_server_errors(case: schemathesis.Case, seeded: Seeded) -> None:
    ids = seeded.ensure()
    for name in ID_PARAMETERS:
        if case.path_parameters and name in case.path_parameters and aim(case.path_parameters[name]):
            case.path_parameters[name] = ids[name]
    if isinstance(case.body, dict) and "dataset_id" in case.body and aim(case.body["dataset_id"]):
        case.body["dataset_id"] = ids["dataset_id"]
    response = case.call(app=seeded.app, headers=seeded.admin.headers)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])


# -- what the fuzzer found, pinned ----------------------------------------------------------------------------


@sqlite_only
def test_timestamps_carry_their_utc_offset(client: TestClient, trained_run: TrainedRun) -> None:
    """The database hands timestamps back without an offset: answers said ``2026-01-02T03:04:05`` where the
    schema promises an RFC 3339 date-time, and a job's creation time read back differed from the one its
    POST answered (``...Z``)."""
    dataset = upload_zip(client, dataset_files(per_class=4))
    r = client.post("/api/v1/jobs", json={"dataset_id": dataset["id"], "model": "lenet", "weights": "none"})
    created = r.json()
    job_id = created["id"]
    client.post(f"/api/v1/jobs/{job_id}/cancel")
    model_id = add_model(client, trained_run)
    answers = [
        client.get(f"/api/v1/datasets/{dataset['id']}").json(),
        client.get("/api/v1/datasets").json()[0],
        client.get(f"/api/v1/jobs/{job_id}").json(),
        client.get("/api/v1/jobs").json()[-1],
        client.get(f"/api/v1/models/{model_id}").json(),
        client.get("/api/v1/models").json()[0],
    ]
    for answer in answers:
        assert is_utc(answer["created_at"]), answer
    job = answers[2]
    assert job["created_at"] == created["created_at"]
    assert is_utc(job["finished_at"]) and job["started_at"] is None


def is_utc(value: str) -> bool:
    return datetime.fromisoformat(value).utcoffset() == timedelta(0)
