"""Per-user limits: predict and upload rate limits (429 ``rate_limited`` with Retry-After), and the cap on
queued jobs (429 ``too_many_queued_jobs``), each configured in Settings and tried here with tiny values."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.db.tables import new_id
from app.domain_errors import LimitReached
from app.errors import http_status
from app.main import create_app
from app.services import ratelimit
from app.services.ratelimit import RateLimiter, RateLimits
from app.settings import Settings
from tests.app.conftest import (
    Account,
    assert_error,
    authed_client,
    count_rows,
    dataset_files,
    make_account,
    sqlite_only,
    stored_files,
    upload_zip,
    zip_bytes,
)

TINY_JOB = {"model": "lenet", "weights": "none", "epochs": 1}


def limited(settings: Settings, **limits: float) -> Settings:
    return settings.model_copy(update=limits)


@pytest.fixture
def two_users(settings: Settings, admin: Account) -> tuple[Account, Account]:
    return make_account(settings, "alice"), make_account(settings, "bob")


def test_defaults_are_generous() -> None:
    s = Settings()
    assert s.rate_limit_predict_per_minute == 1200
    assert s.rate_limit_uploads_per_hour == 60
    assert s.max_queued_jobs_per_user == 20


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_RATE_LIMIT_PREDICT_PER_MINUTE", "30")
    monkeypatch.setenv("FINETUNE_RATE_LIMIT_UPLOADS_PER_HOUR", "0")
    monkeypatch.setenv("FINETUNE_MAX_QUEUED_JOBS_PER_USER", "3")
    s = Settings()
    assert (s.rate_limit_predict_per_minute, s.rate_limit_uploads_per_hour, s.max_queued_jobs_per_user) == (30, 0, 3)
    monkeypatch.setenv("FINETUNE_MAX_QUEUED_JOBS_PER_USER", "-1")
    with pytest.raises(ValueError, match="max_queued_jobs_per_user"):
        Settings()


# -- the token bucket -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(ratelimit.time, "monotonic", c)
    return c


def test_bucket_refills_at_its_rate(clock: Clock) -> None:
    limiter = RateLimiter(per_minute=60, burst=2)  # one a second, two at once
    limiter.take("u", "x")
    limiter.take("u", "x")
    with pytest.raises(LimitReached) as refused:
        limiter.take("u", "x")
    assert http_status(refused.value) == 429 and refused.value.code == "rate_limited"
    assert refused.value.retry_after == 1
    limiter.take("other", "x")  # buckets are per key
    clock.now += 1.0
    limiter.take("u", "x")
    with pytest.raises(LimitReached):
        limiter.take("u", "x")
    clock.now += 3600
    for _ in range(2):  # refills up to the burst, no more
        limiter.take("u", "x")
    with pytest.raises(LimitReached):
        limiter.take("u", "x")


def test_zero_turns_a_limit_off(clock: Clock) -> None:
    limits = RateLimits.from_settings(Settings(rate_limit_predict_per_minute=0, rate_limit_uploads_per_hour=0))
    for _ in range(5000):
        limits.predict.take("u", "predict")
        limits.uploads.take("u", "upload")


def test_an_hourly_allowance_may_be_spent_at_once(clock: Clock) -> None:
    uploads = RateLimits.from_settings(Settings(rate_limit_uploads_per_hour=3)).uploads
    for _ in range(3):
        uploads.take("u", "upload")
    with pytest.raises(LimitReached) as refused:
        uploads.take("u", "upload")
    assert refused.value.retry_after == 1200  # one upload comes back every 20 minutes
    clock.now += 1200
    uploads.take("u", "upload")


# -- over HTTP ------------------------------------------------------------------------------------------------


@sqlite_only
def test_predict_rate_limit(settings: Settings, two_users: tuple[Account, Account]) -> None:
    alice, bob = two_users
    app = create_app(limited(settings, rate_limit_predict_per_minute=2))
    url = f"/api/v1/models/{new_id()}/predict"
    image = {"images": ("a.png", b"not needed: the model does not exist")}
    with authed_client(app, alice) as a, authed_client(app, bob) as b:
        for _ in range(2):
            assert_error(a.post(url, files=image), 404, "not_found")
        r = a.post(url, files=image)
        error = assert_error(r, 429, "rate_limited")
        assert "predict" in error["message"]
        retry = int(r.headers["retry-after"])
        assert 1 <= retry <= 30  # 2 a minute: one comes back every 30 s
        assert str(retry) in error["message"]
        assert_error(b.post(url, files=image), 404, "not_found")  # bob has his own bucket
    # another app (another API process) keeps its own buckets
    with authed_client(create_app(limited(settings, rate_limit_predict_per_minute=2)), alice) as a:
        assert_error(a.post(url, files=image), 404, "not_found")


@sqlite_only
def test_upload_rate_limit(settings: Settings, two_users: tuple[Account, Account]) -> None:
    alice, bob = two_users
    app = create_app(limited(settings, rate_limit_uploads_per_hour=1))
    archive = zip_bytes(dataset_files(per_class=4))
    with authed_client(app, alice) as a, authed_client(app, bob) as b:
        upload_zip(a, dataset_files(per_class=4))
        before = stored_files(settings)
        r = a.post("/api/v1/datasets", files={"archive": ("d.zip", archive)})
        error = assert_error(r, 429, "rate_limited")
        assert "upload" in error["message"]
        assert 3000 < int(r.headers["retry-after"]) <= 3600
        assert stored_files(settings) == before and count_rows(settings, "datasets") == 1
        # a raw zip body counts the same
        r = a.post("/api/v1/datasets", content=archive, headers={"content-type": "application/zip"})
        assert_error(r, 429, "rate_limited")
        upload_zip(b, dataset_files(per_class=4))  # bob's allowance is his own
        # other routes are not limited
        assert a.get("/api/v1/datasets").status_code == 200


@sqlite_only
def test_queued_jobs_cap(settings: Settings, two_users: tuple[Account, Account]) -> None:
    alice, bob = two_users
    app = create_app(limited(settings, max_queued_jobs_per_user=2))
    with authed_client(app, alice) as a, authed_client(app, bob) as b:
        dataset = upload_zip(a, dataset_files(per_class=4))["id"]
        jobs = [a.post("/api/v1/jobs", json={"dataset_id": dataset, **TINY_JOB}) for _ in range(2)]
        assert [r.status_code for r in jobs] == [202, 202]
        r = a.post("/api/v1/jobs", json={"dataset_id": dataset, **TINY_JOB})
        error = assert_error(r, 429, "too_many_queued_jobs")
        assert "2" in error["message"] and "max_queued_jobs_per_user" in error["message"]
        assert error["details"] == {"queued": 2, "max_queued_jobs_per_user": 2}
        assert count_rows(settings, "jobs") == 2
        assert app.state.queue.depth() == 2  # type: ignore[attr-defined]

        other = upload_zip(b, dataset_files(per_class=4))["id"]
        assert b.post("/api/v1/jobs", json={"dataset_id": other, **TINY_JOB}).status_code == 202  # per user

        first = jobs[0].json()["id"]
        assert a.post(f"/api/v1/jobs/{first}/cancel").json()["status"] == "cancelled"
        r = a.post("/api/v1/jobs", json={"dataset_id": dataset, **TINY_JOB})  # room again
        assert r.status_code == 202, r.text
        # resuming queues a job again: the same cap
        assert_error(a.post(f"/api/v1/jobs/{first}/resume"), 429, "too_many_queued_jobs")
        assert a.get(f"/api/v1/jobs/{first}").json()["status"] == "cancelled"


@sqlite_only
def test_an_admin_resuming_a_users_job_counts_against_that_user(
    settings: Settings, admin: Account, two_users: tuple[Account, Account]
) -> None:
    alice, _ = two_users
    app = create_app(limited(settings, max_queued_jobs_per_user=1))
    with authed_client(app, alice) as a, authed_client(app, admin) as boss:
        dataset = upload_zip(a, dataset_files(per_class=4))["id"]
        first = a.post("/api/v1/jobs", json={"dataset_id": dataset, **TINY_JOB}).json()["id"]
        a.post(f"/api/v1/jobs/{first}/cancel")
        assert a.post("/api/v1/jobs", json={"dataset_id": dataset, **TINY_JOB}).status_code == 202
        assert_error(boss.post(f"/api/v1/jobs/{first}/resume"), 429, "too_many_queued_jobs")
        # the admin's own queue is separate
        assert boss.post("/api/v1/jobs", json={"dataset_id": dataset, **TINY_JOB}).status_code == 202


@sqlite_only
def test_zero_means_no_cap(settings: Settings, two_users: tuple[Account, Account]) -> None:
    alice, _ = two_users
    app = create_app(limited(settings, max_queued_jobs_per_user=0))
    with authed_client(app, alice) as a:
        dataset = upload_zip(a, dataset_files(per_class=4))["id"]
        for _ in range(25):
            assert a.post("/api/v1/jobs", json={"dataset_id": dataset, **TINY_JOB}).status_code == 202


@sqlite_only
def test_limits_are_documented(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "429" in paths["/api/v1/models/{model_id}/predict"]["post"]["responses"]
    assert "429" in paths["/api/v1/datasets"]["post"]["responses"]
    assert "429" in paths["/api/v1/jobs"]["post"]["responses"]
