"""The job state machine (app/jobs/state.py) on SQLite and PostgreSQL: each transition happens once when
several processes race for it, the queued-job cap holds under concurrent submits, lost races answer 409,
and leases are judged on the database's clock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db import session_scope
from app.db.tables import Job, JobStatus, User
from app.domain_errors import LimitReached
from app.jobs import state
from app.jobs.queue import JobQueue
from app.jobs.recovery import resend_lost_messages
from app.services import jobs as job_svc
from app.settings import Settings
from finetune.config import TrainConfig
from tests.app.conftest import assert_error, dataset_files, upload_zip

API = "/api/v1/jobs"
TINY = {"model": "lenet", "weights": "none", "image_size": 32, "batch_size": 8, "epochs": 2}
T = TypeVar("T")


@pytest.fixture
def dataset(client: TestClient) -> dict:
    return upload_zip(client, dataset_files(per_class=4))


def race(n: int, action: Callable[[int], T]) -> list[T | BaseException]:
    """Run ``action(i)`` in ``n`` threads released at the same instant; returns each result or exception."""
    barrier = threading.Barrier(n)
    results: list[T | BaseException] = [RuntimeError("did not run")] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = action(i)
        except BaseException as e:  # collected for the assertions
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def queued_count(settings: Settings, owner_id: str) -> int:
    with session_scope(settings.db_url) as s:
        return len(s.scalars(select(Job.id).where(Job.owner_id == owner_id, Job.status == JobStatus.QUEUED)).all())


def test_the_queued_job_cap_holds_under_concurrent_submits(
    client: TestClient, dataset: dict, settings: Settings
) -> None:
    """Twelve submits at once with room for three: three jobs, nine 429s, nothing else (the count and the
    insert are one statement; PostgreSQL also locks the user's row)."""
    settings.max_queued_jobs_per_user = 3
    config = TrainConfig(**TINY, data="<dataset>", out="<run>").validate()

    def submit(_: int) -> str:
        with session_scope(settings.db_url) as s:
            owner = s.scalars(select(User).where(User.name == "admin")).one()
            from app.db.tables import Dataset

            ds = s.get(Dataset, dataset["id"])
            assert ds is not None
            return job_svc.create_job(s, owner, ds, config, settings).id

    results = race(12, submit)
    created = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, LimitReached) and r.code == "too_many_queued_jobs"]
    assert len(created) == 3 and len(refused) == 9, results
    assert {e.code for e in refused} == {"too_many_queued_jobs"}
    with session_scope(settings.db_url) as s:
        admin_id = s.scalars(select(User.id).where(User.name == "admin")).one()
    assert queued_count(settings, admin_id) == 3


def test_a_cancel_racing_a_claim_is_never_lost(client: TestClient, dataset: dict, settings: Settings) -> None:
    """Over many races between a claim and a cancel, either the cancel wins (cancelled, never claimed) or the
    claim wins and the cancel is recorded as a request its process obeys; never `cancelled` while held."""
    for _ in range(8):
        job_id = client.post(API, json={"dataset_id": dataset["id"], **TINY}).json()["id"]

        def act(i: int, job_id: str = job_id) -> Any:
            with session_scope(settings.db_url) as s:
                if i == 0:
                    return state.claim(s, job_id, "worker-a")
                return state.request_cancel(s, job_id)

        claimed, cancel = race(2, act)
        with session_scope(settings.db_url) as s:
            row = s.get(Job, job_id)
            assert row is not None
            if claimed is None:
                assert cancel is state.CancelOutcome.CANCELLED
                assert (row.status, row.attempt) == (JobStatus.CANCELLED, 0)
            else:
                assert cancel is state.CancelOutcome.REQUESTED, (claimed, cancel)
                assert (row.status, row.attempt, row.cancel_requested) == (JobStatus.RUNNING, 1, True)
                assert state.should_stop(s, job_id, 1)  # its process stops at the next batch
                assert state.cancelled(s, job_id, 1)
        assert client.get(f"{API}/{job_id}").json()["status"] == "cancelled"


def test_only_one_of_concurrent_resumes_wins(client: TestClient, dataset: dict, settings: Settings) -> None:
    job_id = client.post(API, json={"dataset_id": dataset["id"], **TINY}).json()["id"]
    assert client.post(f"{API}/{job_id}/cancel").json()["status"] == "cancelled"

    def resume(_: int) -> bool:
        with session_scope(settings.db_url) as s:
            return state.resume(s, job_id, "nobody-capped", "again", max_queued=0)

    assert sorted(race(6, resume)) == [False] * 5 + [True]  # type: ignore[type-var]
    assert client.get(f"{API}/{job_id}").json()["status"] == "queued"
    assert_error(client.post(f"{API}/{job_id}/resume"), 409, "not_resumable")  # a lost race answers 409


def test_a_job_that_ended_cannot_be_cancelled_or_deleted_twice(client: TestClient, dataset: dict) -> None:
    job_id = client.post(API, json={"dataset_id": dataset["id"], **TINY}).json()["id"]
    assert client.post(f"{API}/{job_id}/cancel").status_code == 200
    assert_error(client.post(f"{API}/{job_id}/cancel"), 409, "not_cancellable")
    assert client.delete(f"{API}/{job_id}").status_code == 204
    assert_error(client.delete(f"{API}/{job_id}"), 404, "not_found")


def test_nothing_writes_status_but_the_transitions(client: TestClient, dataset: dict, settings: Settings) -> None:
    job_id = client.post(API, json={"dataset_id": dataset["id"], **TINY}).json()["id"]
    with session_scope(settings.db_url) as s:
        assert state.claim(s, job_id, "w") == 1
        with pytest.raises(ValueError, match="transitions"):
            state.fenced_update(s, job_id, 1, status=JobStatus.SUCCEEDED)
        assert state.fenced_update(s, job_id, 1, message="fine")
        assert state.claim(s, job_id, "another") is None  # a duplicate message finds it taken


def test_leases_are_on_the_database_clock(client: TestClient, dataset: dict, settings: Settings) -> None:
    """A lease ends lease_seconds after the database's now(); it lapses by the database's clock alone (the
    test moves the lease, not any host's clock)."""
    job_id = client.post(API, json={"dataset_id": dataset["id"], **TINY}).json()["id"]
    with session_scope(settings.db_url) as s:
        attempt = state.claim(s, job_id, "w", lease_seconds=30)
        assert attempt == 1
        db_now = s.scalar(select(state.db_now()))
        row = s.get(Job, job_id)
        assert row is not None and row.lease_expires_at is not None and db_now is not None
        left = _utc(row.lease_expires_at) - _utc(db_now)
        assert timedelta(seconds=25) < left <= timedelta(seconds=30)
        assert s.scalars(select(Job.id).where(Job.id == job_id, state.lease_expired())).all() == []
        lease = state.renew(s, job_id, 1, lease_seconds=0.5)
        assert lease.held and not lease.cancel_requested
    with session_scope(settings.db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=state.db_now(-0.1)))
    with session_scope(settings.db_url) as s:
        assert s.scalars(select(Job.id).where(Job.id == job_id, state.lease_expired())).all() == [job_id]
        # The holder renews before the recovery acts: the recovery's requeue is conditional on the lapse.
        assert state.renew(s, job_id, 1, lease_seconds=30).held
        assert state.requeue(s, job_id, 1, "lost", retry=True, max_retries=3, only_if_expired=True) is (
            state.Requeued.LOST
        )
        assert s.get(Job, job_id).status == JobStatus.RUNNING  # type: ignore[union-attr]


def test_a_requeue_honours_a_cancel_asked_for_meanwhile(client: TestClient, dataset: dict, settings: Settings) -> None:
    job_id = client.post(API, json={"dataset_id": dataset["id"], **TINY}).json()["id"]
    with session_scope(settings.db_url) as s:
        assert state.claim(s, job_id, "w") == 1
        assert state.request_cancel(s, job_id) is state.CancelOutcome.REQUESTED
        assert state.requeue(s, job_id, 1, "drained", retry=False) is state.Requeued.CANCELLED
    assert client.get(f"{API}/{job_id}").json()["status"] == "cancelled"


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def test_a_failed_enqueue_is_still_accepted_and_sent_later(
    client: TestClient, dataset: dict, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue is down when a job is submitted: the job is committed, so the client gets its 202 (not a 500
    for a job that exists), and the workers' sweep sends its message once the queue is back."""

    def down(job_id: str) -> None:
        raise ConnectionError("the queue is not reachable")

    monkeypatch.setattr(client.app.state.queue, "enqueue", down)  # type: ignore[attr-defined]
    r = client.post(API, json={"dataset_id": dataset["id"], **TINY})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with session_scope(settings.db_url) as s:
        s.execute(
            update(Job).where(Job.id == job_id).values(enqueued_at=state.db_now(-settings.lost_message_seconds - 1))
        )
    queue = JobQueue(settings)
    try:
        assert job_id not in queue.pending_job_ids()
        assert resend_lost_messages(settings, queue) == [job_id]
        assert job_id in queue.pending_job_ids()
    finally:
        queue.close()
