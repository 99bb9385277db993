"""Two users on every route: another user's dataset, job or model answers exactly like an id that does not
exist (same status, same error code, same message but for the id), lists show only one's own rows, and an
admin sees and acts on everything.

The routes are a table: a new route with an id in it goes in ``ID_ROUTES`` (or ``PAGES``); a test enumerates
the app's routes and fails on any route under /api/v1 the tables do not name."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import session_scope
from app.db.tables import Job, new_id
from app.main import API_PREFIX, create_app
from app.settings import Settings
from tests.app.conftest import (
    COLOURS,
    Account,
    assert_error,
    authed_client,
    dataset_files,
    make_account,
    make_image,
    upload_zip,
)
from tests.app.test_auth import routes_of
from tests.app.test_models_api import TrainedRun, add_model, train_once

SECRET = "alice-secret"  # in the names of alice's rows: no page or list of bob's may show it
TINY_JOB = {"model": "lenet", "weights": "none", "epochs": 1}


@dataclass(frozen=True)
class Route:
    """A route that takes the id of someone's row (in the path, or ``dataset_id`` in a job request)."""

    method: str
    path: str
    admin_status: int  # what an admin acting on alice's row gets
    job_status: str | None = None  # alice's job is put in this state before the admin acts
    body: dict[str, Any] | None = None
    image: bool = False  # a predict request: one PNG

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def request(self, client: TestClient, ids: dict[str, str]) -> Any:
        path = self.path.format(index=0, **ids)
        kwargs: dict[str, Any] = {}
        if self.body is not None:
            kwargs["json"] = {k: v.format(**ids) if isinstance(v, str) else v for k, v in self.body.items()}
        if self.image:
            kwargs["files"] = {"images": ("a.png", make_image(COLOURS["red"], random.Random(0)))}
        return client.request(self.method, path, **kwargs)


ID_ROUTES = [
    Route("GET", "/api/v1/datasets/{dataset_id}", 200),
    Route("GET", "/api/v1/datasets/{dataset_id}/report", 200),
    Route("GET", "/api/v1/datasets/{dataset_id}/files", 200),
    Route("GET", "/api/v1/datasets/{dataset_id}/thumbnails/{index}", 200),
    Route("GET", "/api/v1/datasets/{dataset_id}/defaults", 200),
    Route("DELETE", "/api/v1/datasets/{dataset_id}", 204, job_status="cancelled"),
    Route("POST", "/api/v1/jobs", 202, body={"dataset_id": "{dataset_id}", **TINY_JOB}),
    Route("GET", "/api/v1/jobs/{job_id}", 200),
    Route("GET", "/api/v1/jobs/{job_id}/events", 200, job_status="succeeded"),
    Route("POST", "/api/v1/jobs/{job_id}/cancel", 200),
    Route("POST", "/api/v1/jobs/{job_id}/resume", 202, job_status="failed"),
    Route("DELETE", "/api/v1/jobs/{job_id}", 204, job_status="cancelled"),
    Route("GET", "/api/v1/models/{model_id}", 200),
    Route("GET", "/api/v1/models/{model_id}/download", 200),
    Route("DELETE", "/api/v1/models/{model_id}", 204),
    Route("POST", "/api/v1/models/{model_id}/predict", 200, image=True),
    Route("GET", "/api/v1/models/{model_id}/export", 200),
    Route("POST", "/api/v1/models/{model_id}/exports", 200),
    Route("PUT", "/api/v1/models/{model_id}/serving", 200, body={"precision": "fp32"}),
    Route("PATCH", "/api/v1/models/{model_id}", 200, body={"threshold": 0.5}),
    Route("GET", "/api/v1/models/{model_id}/misclassified", 200),
    # The shared model got every test image right, so even an admin finds no image 0 in its gallery; a model
    # with wrong answers, its thumbnails and another user's 404 are in test_misclassified_api.py.
    Route("GET", "/api/v1/models/{model_id}/misclassified/{index}/thumbnail", 404),
]
# Routes under /api/v1 without anyone's id: lists (test_lists_show_only_ones_own_rows) and the rest.
LISTS = {"/api/v1/datasets": "datasets", "/api/v1/jobs": "jobs", "/api/v1/models": "models"}
NO_ROWS_OF_OTHERS = {
    ("POST", "/api/v1/datasets"): "an upload makes a dataset of the caller's own",
    ("GET", "/api/v1/weights"): "server-wide files, no user's rows",
    ("GET", "/api/v1/workers"): "the worker registry: admins only (test_workers.py), no user's rows",
}
PAGES = ["/datasets/{dataset_id}", "/jobs/{job_id}", "/models/{model_id}"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return train_once(tmp_path_factory)


@dataclass
class World:
    app: FastAPI
    settings: Settings
    admin: TestClient
    alice: TestClient
    bob: TestClient
    alice_id: str
    bob_id: str
    admin_id: str
    ids: dict[str, str] = field(default_factory=dict)  # alice's dataset, queued job and model
    bob_dataset: str = ""

    def set_job(self, status: str) -> None:
        with session_scope(self.settings.db_url) as s:
            s.execute(update(Job).where(Job.id == self.ids["job_id"]).values(status=status))


@pytest.fixture
def world(settings: Settings, admin: Account, trained_run: TrainedRun) -> Iterator[World]:
    """alice: a dataset, a queued job on it and a trained model; bob: a dataset; and the admin."""
    app = create_app(settings)
    alice, bob = make_account(settings, "alice"), make_account(settings, "bob")
    with ExitStack() as stack:
        clients = [stack.enter_context(authed_client(app, a)) for a in (admin, alice, bob)]
        w = World(app, settings, *clients, alice_id=alice.user_id, bob_id=bob.user_id, admin_id=admin.user_id)
        dataset = upload_zip(w.alice, dataset_files(per_class=4), name=f"{SECRET} dataset")
        r = w.alice.post("/api/v1/jobs", json={"dataset_id": dataset["id"], **TINY_JOB})
        assert r.status_code == 202, r.text
        model = add_model(app, trained_run, owner_id=alice.user_id, name=f"{SECRET} model")
        w.ids = {"dataset_id": dataset["id"], "job_id": r.json()["id"], "model_id": model}
        w.bob_dataset = upload_zip(w.bob, dataset_files(per_class=4, seed=1), name="bob's dataset")["id"]
        yield w


def alices_rows(w: World) -> list[Any]:
    """What alice reads of her rows (a change made by someone else would show here)."""
    return [
        w.alice.get(f"/api/v1/datasets/{w.ids['dataset_id']}").json(),
        w.alice.get(f"/api/v1/jobs/{w.ids['job_id']}").json(),
        w.alice.get(f"/api/v1/models/{w.ids['model_id']}").json(),
        sorted(j["id"] for j in w.alice.get("/api/v1/jobs").json()),
    ]


def unknown_ids() -> dict[str, str]:
    return {"dataset_id": new_id(), "job_id": new_id(), "model_id": new_id()}


def without_ids(text: str, ids: dict[str, str]) -> str:
    for value in ids.values():
        text = text.replace(value, "<id>")
    return text


# -- the table covers the app --------------------------------------------------------------------------------


def test_every_api_route_is_in_the_table(settings: Settings) -> None:
    app = create_app(settings)
    table = {(r.method, r.path) for r in ID_ROUTES} | set(NO_ROWS_OF_OTHERS) | {("GET", p) for p in LISTS}
    api = {(m, p) for m, p in routes_of(app) if p.startswith(API_PREFIX + "/")}
    assert api - table == set(), "add these routes to ID_ROUTES (or say why not in NO_ROWS_OF_OTHERS)"
    assert table - api == set(), "the table names routes the app does not have"
    pages = {p for m, p in routes_of(app) if m == "GET" and not p.startswith(API_PREFIX + "/") and "{" in p}
    assert pages == set(PAGES), "add pages that show someone's row to PAGES"


# -- another user's ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ID_ROUTES, ids=str)
def test_another_users_id_is_like_an_unknown_id(world: World, route: Route) -> None:
    before = alices_rows(world)
    unknown = unknown_ids()
    theirs = route.request(world.bob, world.ids)
    nobodys = route.request(world.bob, unknown)
    error = assert_error(theirs, 404, "not_found")
    assert_error(nobodys, 404, "not_found")
    assert without_ids(theirs.text, world.ids) == without_ids(nobodys.text, unknown)
    assert theirs.headers.get("content-type") == nobodys.headers.get("content-type")
    assert error["message"].endswith(" not found")
    # nothing of alice's changed, and she still reaches it all
    assert alices_rows(world) == before


@pytest.mark.parametrize("route", ID_ROUTES, ids=str)
def test_an_admin_acts_on_everyones_rows(world: World, route: Route) -> None:
    if route.job_status:
        world.set_job(route.job_status)
    r = route.request(world.admin, world.ids)
    assert r.status_code == route.admin_status, r.text
    if route.method == "DELETE":
        kind = route.path.split("/")[3]
        assert_error(world.alice.get(f"/api/v1/{kind}/{world.ids[kind[:-1] + '_id']}"), 404, "not_found")
    if route.path == "/api/v1/jobs":  # a job an admin starts on alice's dataset is the admin's
        assert r.json()["dataset_id"] == world.ids["dataset_id"]
        assert r.json()["id"] not in {j["id"] for j in world.alice.get("/api/v1/jobs").json()}
    if route.path.endswith("/events"):
        assert "event: end" in r.text


@pytest.mark.parametrize("page", PAGES)
def test_another_users_page_is_like_an_unknown_one(world: World, page: str) -> None:
    unknown = unknown_ids()
    theirs = world.bob.get(page.format(**world.ids))
    nobodys = world.bob.get(page.format(**unknown))
    assert theirs.status_code == nobodys.status_code == 404
    assert without_ids(theirs.text, world.ids) == without_ids(nobodys.text, unknown)
    assert SECRET not in theirs.text
    for client in (world.alice, world.admin):
        r = client.get(page.format(**world.ids))
        assert r.status_code == 200 and SECRET in r.text


# -- lists ------------------------------------------------------------------------------------------------------


def ids_in(client: TestClient, path: str) -> set[str]:
    r = client.get(path)
    assert r.status_code == 200, r.text
    return {row["id"] for row in r.json()}


def test_lists_show_only_ones_own_rows(world: World) -> None:
    w = world
    alice_jobs = ids_in(w.alice, "/api/v1/jobs")
    assert w.ids["job_id"] in alice_jobs and len(alice_jobs) == 2  # the queued one and the model's
    assert ids_in(w.alice, "/api/v1/datasets") == {w.ids["dataset_id"]}
    assert ids_in(w.alice, "/api/v1/models") == {w.ids["model_id"]}
    assert ids_in(w.alice, "/api/v1/jobs?status=queued") == {w.ids["job_id"]}

    assert ids_in(w.bob, "/api/v1/datasets") == {w.bob_dataset}
    assert ids_in(w.bob, "/api/v1/jobs") == set()
    assert ids_in(w.bob, "/api/v1/jobs?status=queued") == set()
    assert ids_in(w.bob, "/api/v1/models") == set()

    assert ids_in(w.admin, "/api/v1/datasets") == {w.ids["dataset_id"], w.bob_dataset}
    assert ids_in(w.admin, "/api/v1/jobs") == alice_jobs
    assert ids_in(w.admin, "/api/v1/models") == {w.ids["model_id"]}
    assert set(LISTS) == {"/api/v1/datasets", "/api/v1/jobs", "/api/v1/models"}


def test_pages_list_only_ones_own_rows(world: World) -> None:
    w = world
    for page in ("/", "/jobs/new", f"/jobs/new?dataset={w.ids['dataset_id']}"):
        r = w.bob.get(page)
        assert r.status_code == 200, page
        assert SECRET not in r.text, page
        assert SECRET in w.alice.get(page).text and SECRET in w.admin.get(page).text
    assert "bob&#39;s dataset" in w.bob.get("/").text


def test_someone_elses_dataset_cannot_be_trained_on(world: World, settings: Settings) -> None:
    body = {"dataset_id": world.ids["dataset_id"], **TINY_JOB}
    assert_error(world.bob.post("/api/v1/jobs", json=body), 404, "not_found")
    with session_scope(settings.db_url) as s:
        owners = {job.owner_id for job in s.query(Job)}
    assert owners == {world.alice_id}


def test_a_nul_in_an_id_is_not_found(world: World) -> None:
    """PostgreSQL refuses NUL in a query parameter: every route answers 404 rather than 500."""
    for route in ID_ROUTES:
        assert_error(route.request(world.admin, dict.fromkeys(world.ids, "a%00b")), 404, "not_found")
    assert_error(world.admin.post("/api/v1/jobs", json={"dataset_id": "a\x00b", **TINY_JOB}), 404, "not_found")
