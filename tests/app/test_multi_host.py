"""Several machines for real: processes as hosts sharing one PostgreSQL database, one Redis queue and one data
folder, each with its own host name (``unshare --uts``), home folder (so its own caches) and working
directory; host ``c`` sees the shared folder bind-mounted at another path (``unshare --mount``); two
"twin" workers are both PID 1 (``unshare --pid``) on the same host name. Default lease and heartbeat
settings: the takeover time measured here is the one an operator gets.

What it proves, one test each (they share the cluster and run in order):

1. 10 jobs over 3 workers each run exactly once, and either API serves either worker's models.
2. kill -9 of a worker mid-job: another worker resumes the job within 20 s, one new attempt, checkpoints whole.
3. SIGTERM: the worker drains, the job continues elsewhere from its checkpoint, no retry counted.
4. A lost queue message (Redis flushed): the job still runs.
5. Two APIs starting during each other's uploads: no upload lost.
6. Two workers with the same host name and PID: no live job taken back.
7. A cancel racing a claim: the job ends cancelled and no job process keeps training.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from sqlalchemy import select

from app.db import engine_for, session_scope
from app.db.migrate import upgrade
from app.db.tables import Job, Worker
from app.jobs.queue import JobQueue
from app.settings import Settings
from tests.app.conftest import (
    dataset_files,
    drop_pg_database,
    fresh_pg_database,
    job_processes,
    make_account,
    wait_until,
)
from tests.app.test_fault_injection import assert_checkpoints_whole

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
TINY = {"model": "lenet", "weights": "none", "image_size": 32, "batch_size": 8}
LONG = 1000  # epochs (the most a job may ask): still running whenever a test kills, drains or cancels it
FINISHED = ("succeeded", "failed", "cancelled")
TAKEOVER_TARGET_SECONDS = 20.0

# Run inside the host's namespaces: take the host name, mount the shared folder where this host sees it, die
# with the test, then become `python -m app.cli ...`.
HOST_SHIM = """
import ctypes, os, signal, socket, subprocess, sys
name, mount_from, view = sys.argv[1:4]
socket.sethostname(name)
if mount_from:
    subprocess.run(["mount", "--bind", mount_from, view], check=True)
if os.getppid() != 0:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
os.execv(sys.executable, [sys.executable, "-m", "app.cli", *sys.argv[4:]])
"""


def _die_with_test() -> None:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Host:
    name: str
    kind: str  # "api" | "worker"
    env: dict[str, str]
    root: Path
    mount_from: str = ""  # the shared folder, bind-mounted at env's data folder (host c)
    pid1: bool = False  # its own PID namespace: the worker is PID 1 there
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    starts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        self.starts += 1
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        (self.root / "work").mkdir(parents=True, exist_ok=True)
        self.log = open(self.root / f"{self.kind}-{self.starts}.log", "wb")  # noqa: SIM115 - closed in stop()
        unshare = ["unshare", "--uts"]
        if self.mount_from:
            unshare.append("--mount")
        if self.pid1:
            unshare += ["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]
        args = ["serve", "--no-worker", "--port", str(self.port)] if self.kind == "api" else ["worker"]
        view = self.env["FINETUNE_DATA_DIR"]
        self.proc = subprocess.Popen(
            [*unshare, sys.executable, "-c", HOST_SHIM, self.name, self.mount_from, view, *args],
            env=self.env,
            cwd=self.root / "work",
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_test,
        )

    @property
    def pid(self) -> int:
        """The process to signal: the worker or API itself (with a PID namespace: unshare's child)."""
        assert self.proc is not None
        if not self.pid1:
            return self.proc.pid
        return int(wait_until(lambda: _child_of(self.proc.pid), 30, f"{self.name}'s process"))  # type: ignore[union-attr]

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob(f"{self.kind}-*.log")))


def _child_of(pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    return int(entry.name)
    return None


class Cluster:
    def __init__(self, tmp: Path, db_url: str) -> None:
        self.tmp = tmp
        self.shared = tmp / "shared"
        self.shared.mkdir()
        self.queue_name = f"mh-{uuid.uuid4().hex[:8]}"
        self.settings = Settings(
            data_dir=self.shared,
            database_url=db_url,
            queue_backend="redis",
            queue_url="redis://127.0.0.1:6379/0",
            queue_name=self.queue_name,
            local_cache_dir=tmp / "test-cache",
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
        self.base_env = {
            **base,
            "PYTHONPATH": str(REPO),
            "FINETUNE_DATABASE_URL": db_url,
            "FINETUNE_QUEUE_BACKEND": "redis",
            "FINETUNE_QUEUE_URL": "redis://127.0.0.1:6379/0",
            "FINETUNE_QUEUE_NAME": self.queue_name,
        }
        self.hosts: dict[str, Host] = {}
        self.admin = ""
        self.dataset_id = ""

    def host(self, name: str, kind: str, *, other_mount: bool = False, pid1: bool = False) -> Host:
        root = self.tmp / "hosts" / name
        view = self.shared
        mount_from = ""
        if other_mount:  # this host sees the shared folder at a path of its own
            view = root / "mnt" / "finetune-data"
            view.mkdir(parents=True)
            mount_from = str(self.shared)
        env = {**self.base_env, "HOME": str(root / "home"), "FINETUNE_DATA_DIR": str(view)}
        host = Host(name, kind, env, root, mount_from=mount_from, pid1=pid1, port=free_port() if kind == "api" else 0)
        self.hosts[name] = host
        return host

    def api(self, name: str = "api-1") -> httpx.Client:
        port = self.hosts[name].port
        return httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {self.admin}"}, timeout=60
        )

    def healthy(self, name: str) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.hosts[name].port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def live_workers(self) -> list[Worker]:
        with session_scope(self.settings.db_url) as s:
            rows = s.scalars(select(Worker).where(Worker.stopped_at.is_(None))).all()
            s.expunge_all()
            return list(rows)

    def job(self, job_id: str) -> Job:
        with session_scope(self.settings.db_url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            s.expunge(job)
            return job

    def holder(self, job_id: str) -> Host:
        """The host whose worker holds the job now."""
        worker_id = self.job(job_id).worker
        with session_scope(self.settings.db_url) as s:
            worker = s.get(Worker, worker_id)
            assert worker is not None, job_id
            host, started = worker.host, worker.started_at
        if host != "twin":
            return self.hosts[host]
        twins = sorted((w for w in self.live_workers() if w.host == "twin"), key=lambda w: w.started_at)
        return self.hosts["twin-1" if twins[0].started_at == started else "twin-2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[Cluster]:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("the multi-host test needs unshare and root (namespaces for host names, mounts and PIDs)")
    db_url, db_name = fresh_pg_database(pg_server)
    tmp = tmp_path_factory.mktemp("multi-host")
    c = Cluster(tmp, db_url)
    try:
        upgrade(db_url)
        c.admin = make_account(c.settings, "admin", admin=True).key
        for host in (c.host("api-1", "api"), c.host("api-2", "api")):
            host.start()
        for host in (c.host("a", "worker"), c.host("b", "worker"), c.host("c", "worker", other_mount=True)):
            host.start()
        wait_until(lambda: c.healthy("api-1") and c.healthy("api-2"), 120, "both APIs")
        wait_until(lambda: {w.host for w in c.live_workers()} == {"a", "b", "c"}, 120, "three workers")
        with c.api() as api:
            r = api.post("/api/v1/datasets", files={"archive": ("d.zip", zipped(dataset_files(per_class=10)))})
            assert r.status_code == 201, r.text
            c.dataset_id = r.json()["id"]
        yield c
    finally:
        for host in c.hosts.values():
            host.stop()
        with contextlib.suppress(Exception):
            JobQueue(c.settings).huey.flush()
        engine_for(db_url).dispose()
        drop_pg_database(pg_server, db_name)


def zipped(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


def submit(c: Cluster, epochs: int, api: str = "api-1", **overrides: Any) -> str:
    with c.api(api) as client:
        r = client.post("/api/v1/jobs", json={"dataset_id": c.dataset_id, **TINY, "epochs": epochs, **overrides})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def get(c: Cluster, job_id: str, api: str = "api-1") -> dict[str, Any]:
    with c.api(api) as client:
        return client.get(f"/api/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]


def wait_job(c: Cluster, job_id: str, statuses: tuple[str, ...] = FINISHED, timeout: float = 240) -> dict[str, Any]:
    return wait_until(
        lambda: (j := get(c, job_id)) and j["status"] in statuses and j, timeout, f"job {job_id} {statuses}", 0.2
    )


def last_checkpoint(c: Cluster, job_id: str) -> int | None:
    try:
        return int(os.readlink(c.shared / "runs" / job_id / "last").rsplit("-", 1)[1])
    except FileNotFoundError:
        return None


def wait_checkpoint(c: Cluster, job_id: str) -> None:
    wait_until(
        lambda: get(c, job_id)["status"] == "running" and last_checkpoint(c, job_id),
        180,
        f"a checkpoint of {job_id}",
        0.2,
    )


def cancel(c: Cluster, job_id: str) -> None:
    with c.api() as client:
        client.post(f"/api/v1/jobs/{job_id}/cancel")
    wait_job(c, job_id, timeout=60)
    wait_until(lambda: not job_processes(job_id), 30, f"the job process of {job_id} to exit")


def metric_attempts(c: Cluster, job_id: str) -> dict[int, int]:
    from app.db.tables import JobMetric

    with session_scope(c.settings.db_url) as s:
        rows = s.execute(select(JobMetric.epoch, JobMetric.attempt).where(JobMetric.job_id == job_id)).all()
    return {int(e): int(a) for e, a in rows}


STARTED = re.compile(r"job (\w+) attempt (\d+): started process")


def started_attempts(c: Cluster) -> list[tuple[str, int]]:
    """(job, attempt) for every job process any worker started, from the workers' logs."""
    logs = "".join(h.log_text() for h in c.hosts.values() if h.kind == "worker")
    return [(job, int(attempt)) for job, attempt in STARTED.findall(logs)]


# -- 1 --------------------------------------------------------------------------------------------------------


def test_ten_jobs_over_three_workers_run_exactly_once(cluster: Cluster) -> None:
    c = cluster
    jobs = [submit(c, epochs=2, api="api-1" if i % 2 else "api-2") for i in range(10)]
    done = [wait_job(c, j) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 10, done
    assert all(d["attempt"] == 1 and d["retries"] == 0 for d in done), done
    assert all(set(metric_attempts(c, j).values()) == {1} and len(metric_attempts(c, j)) == 2 for j in jobs)
    started = [(job, attempt) for job, attempt in started_attempts(c) if job in jobs]
    assert sorted(started) == sorted((j, 1) for j in jobs), started  # one process per job, each once
    ran_on = {h.name for h in c.hosts.values() if h.kind == "worker" and any(j in h.log_text() for j in jobs)}
    assert len(ran_on) >= 2, ran_on
    # Either API serves a model, whichever worker (and mount point) trained it.
    image = next(iter(dataset_files(per_class=1, seed=5).values()))
    for job, api in ((done[0], "api-1"), (done[1], "api-2")):
        with c.api(api) as client:
            r = client.post(f"/api/v1/models/{job['model_id']}/predict", files={"images": ("x.png", image)})
            assert r.status_code == 200, r.text


# -- 2 --------------------------------------------------------------------------------------------------------


def test_a_killed_workers_job_resumes_elsewhere_within_20_seconds(cluster: Cluster) -> None:
    c = cluster
    job_id = submit(c, epochs=LONG)
    wait_checkpoint(c, job_id)
    victim = c.holder(job_id)
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait(30)
    wait_until(lambda: not job_processes(job_id), 15, "the job process to die with its worker")
    checkpoint = last_checkpoint(c, job_id)
    assert checkpoint is not None

    resumed = wait_until(
        lambda: (j := get(c, job_id))["attempt"] == 2 and j["status"] == "running" and j, 60, "the takeover", 0.1
    )
    took = time.monotonic() - killed_at
    (c.tmp / "takeover-seconds.txt").write_text(f"{took:.2f}\n")
    assert took < TAKEOVER_TARGET_SECONDS, f"takeover took {took:.1f}s"
    assert c.holder(job_id).name != victim.name
    assert resumed["retries"] == 1 and "lease" in resumed["retry_reason"]
    wait_until(lambda: max(metric_attempts(c, job_id).items(), default=(0, 0))[1] == 2, 120, "attempt 2 to train")
    attempts = metric_attempts(c, job_id)
    assert {e: a for e, a in attempts.items() if e <= checkpoint} == dict.fromkeys(range(1, checkpoint + 1), 1)
    cancel(c, job_id)
    assert get(c, job_id)["attempt"] == 2  # one new attempt
    assert_checkpoints_whole(c.shared / "runs" / job_id)
    victim.stop()
    victim.start()  # the host comes back (a new worker id: the dead one's row stays "lost")
    wait_until(lambda: victim.name in {w.host for w in c.live_workers()}, 120, f"{victim.name} to come back")


# -- 3 --------------------------------------------------------------------------------------------------------


def test_sigterm_drains_and_the_job_continues_elsewhere(cluster: Cluster) -> None:
    c = cluster
    job_id = submit(c, epochs=LONG)
    wait_checkpoint(c, job_id)
    drained = c.holder(job_id)
    drained.signal(signal.SIGTERM)
    signalled = time.monotonic()
    requeued = wait_job(c, job_id, ("queued", "running", *FINISHED), timeout=60)
    assert drained.wait(90) == 0
    took = time.monotonic() - signalled
    (c.tmp / "drain-seconds.txt").write_text(f"{took:.2f}\n")
    checkpoint = last_checkpoint(c, job_id)
    assert checkpoint is not None
    continued = wait_until(
        lambda: (j := get(c, job_id))["attempt"] == 2 and j["status"] == "running" and j, 60, "another worker", 0.1
    )
    assert requeued["status"] in ("queued", "running") and continued["retries"] == 0  # a drain is not a retry
    assert c.holder(job_id).name != drained.name
    wait_until(lambda: max(metric_attempts(c, job_id).items(), default=(0, 0))[1] == 2, 120, "attempt 2 to train")
    attempts = metric_attempts(c, job_id)
    assert {e: a for e, a in attempts.items() if e <= checkpoint} == dict.fromkeys(range(1, checkpoint + 1), 1)
    cancel(c, job_id)
    assert_checkpoints_whole(c.shared / "runs" / job_id)
    drained.stop()
    drained.start()
    wait_until(lambda: drained.name in {w.host for w in c.live_workers()}, 120, f"{drained.name} to come back")


# -- 4 --------------------------------------------------------------------------------------------------------


def test_a_lost_queue_message_still_runs(cluster: Cluster) -> None:
    """Every worker drained; a job queued; the queue loses its message (Redis restarted without persistence);
    the workers come back and their sweep sends the message again."""
    c = cluster
    workers = [h for h in c.hosts.values() if h.kind == "worker" and h.proc and h.proc.poll() is None]
    for h in workers:
        h.stop()
    job_id = submit(c, epochs=2)
    queue = JobQueue(c.settings)
    try:
        assert job_id in queue.pending_job_ids()
        queue.huey.flush()
        assert queue.depth() == 0
    finally:
        queue.close()
    for h in workers:
        h.start()
    done = wait_job(c, job_id, timeout=180)
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    logs = "".join(h.log_text() for h in workers)
    assert f"queued job(s) {job_id} had no queue message; sent again" in logs


# -- 5 --------------------------------------------------------------------------------------------------------


def slow_upload(c: Cluster, api: str, halfway: threading.Event, go_on: threading.Event, out: dict[str, Any]) -> None:
    body = zipped(dataset_files(per_class=6, seed=7))
    half = len(body) // 2

    def chunks() -> Iterator[bytes]:
        yield body[:half]
        halfway.set()
        go_on.wait(120)
        yield body[half:]

    with c.api(api) as client:
        r = client.post("/api/v1/datasets?name=slow", content=chunks(), headers={"Content-Type": "application/zip"})
        out["status"], out["body"] = r.status_code, r.text


def test_apis_starting_during_each_others_uploads_lose_none(cluster: Cluster) -> None:
    c = cluster
    for starting, uploading in (("api-2", "api-1"), ("api-1", "api-2")):
        halfway, go_on, out = threading.Event(), threading.Event(), {}
        t = threading.Thread(target=slow_upload, args=(c, uploading, halfway, go_on, out))
        t.start()
        assert halfway.wait(60)
        wait_until(
            lambda: any(p.name.startswith("upload-") for p in (c.shared / "tmp").iterdir()),
            30,
            "the upload's tmp/ entry",
        )
        host = c.hosts[starting]
        host.stop()
        host.start()  # its start cleans tmp/: only its own and stale entries
        wait_until(lambda h=starting: c.healthy(h), 120, f"{starting} to start")
        go_on.set()
        t.join(120)
        assert out.get("status") == 201, out


# -- 6 --------------------------------------------------------------------------------------------------------


def test_two_workers_with_the_same_host_name_and_pid_take_nothing_from_each_other(cluster: Cluster) -> None:
    c = cluster
    others = [h for h in c.hosts.values() if h.kind == "worker" and h.proc and h.proc.poll() is None]
    for h in others:
        h.stop()
    twin1 = c.host("twin-1", "worker", pid1=True)
    twin1.name = "twin"
    twin1.start()
    wait_until(lambda: any(w.host == "twin" for w in c.live_workers()), 120, "the first twin")
    # Larger images make each epoch slower: the job must outlive a worker start and more than a lease.
    job_id = submit(c, epochs=LONG, image_size=96)
    wait_checkpoint(c, job_id)
    twin2 = c.host("twin-2", "worker", pid1=True)
    twin2.name = "twin"
    twin2.start()
    wait_until(lambda: sum(w.host == "twin" for w in c.live_workers()) == 2, 120, "the second twin")
    twins = [w for w in c.live_workers() if w.host == "twin"]
    assert [w.pid for w in twins] == [1, 1] and len({w.id for w in twins}) == 2
    held_by = c.job(job_id).worker
    time.sleep(c.settings.lease_seconds + 3 * c.settings.recovery_interval_seconds)  # more than a lease
    job = c.job(job_id)
    assert (job.status, job.attempt, job.worker, job.retries) == ("running", 1, held_by, 0)
    cancel(c, job_id)
    for t in (twin1, twin2):
        t.stop()
    for h in others:
        h.start()
    wait_until(lambda: {"a", "b", "c"} <= {w.host for w in c.live_workers()}, 120, "the workers to come back")


# -- 7 --------------------------------------------------------------------------------------------------------


def test_a_cancel_racing_a_claim_ends_cancelled_with_no_process_training(cluster: Cluster) -> None:
    c = cluster
    delays = [0.0, 0.05, 0.2, 0.5, 1.0, 2.0]
    jobs = []
    for delay in delays:
        job_id = submit(c, epochs=LONG)
        time.sleep(delay)
        with c.api("api-2") as client:
            r = client.post(f"/api/v1/jobs/{job_id}/cancel")
            assert r.status_code == 200, r.text
        jobs.append(job_id)
    for job_id in jobs:
        ended = wait_job(c, job_id, timeout=90)
        assert ended["status"] == "cancelled", ended
        wait_until(lambda j=job_id: not job_processes(j), 30, f"no process training {job_id}")
        assert ended["epoch"] < LONG
        # Resuming at once starts the next attempt alone in the run folder: the cancelled one has exited.
    with c.api() as client:
        assert client.post(f"/api/v1/jobs/{jobs[-1]}/resume").status_code == 202
    resumed = wait_job(c, jobs[-1], ("running",), timeout=90)
    assert len(job_processes(jobs[-1])) <= 1
    cancel(c, resumed["id"])
