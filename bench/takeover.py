"""``python -m bench.takeover [--rounds N]``: how long a job is without a worker when one dies or drains.

The "Several machines" deployment on one machine: a fresh PostgreSQL database (``FINETUNE_BENCH_PG_URL``,
default the local server's ``test`` database, is where it is created), a Redis queue on 127.0.0.1:6379, a
temporary shared data folder, the API (``serve --no-worker``) and two workers, with the service's default
lease, heartbeat and recovery settings. Each round trains a small job (lenet, 32 px) until its first
checkpoint, then:

- takeover: ``kill -9`` the worker holding it; measured until the other worker runs the job's next attempt;
- drain: ``SIGTERM`` to the worker holding it; measured until the job is back in the queue, until that
  worker has exited, and until the other worker runs it.

The killed or drained worker is started again before the next round. Results go under ``"takeover"`` in
``bench/out/results.json`` (other keys kept), and the "Takeover and drain" section of ``bench/RESULTS.md`` is
written in place. Loopback only; bounded (``--timeout``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from bench.common import ROOT, free_port, machine, stats

OUT = ROOT / "bench" / "out"
PG_URL = os.environ.get("FINETUNE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
JOB = {"model": "lenet", "weights": "none", "image_size": 32, "batch_size": 8, "epochs": 400}


def log(msg: str) -> None:
    print(msg, flush=True)


def dataset_zip() -> bytes:
    rng = random.Random(0)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, colour in (("red", (220, 30, 30)), ("green", (30, 190, 40)), ("blue", (30, 40, 220))):
            for i in range(10):
                img = Image.new("RGB", (40, 40), tuple(rng.randint(0, 255) for _ in range(3)))
                ImageDraw.Draw(img).ellipse([5, 5, 25, 25], fill=colour)
                buf = io.BytesIO()
                img.save(buf, "PNG")
                zf.writestr(f"{name}/{i}.png", buf.getvalue())
    return out.getvalue()


def create_database(admin_url: str) -> tuple[str, str]:
    from sqlalchemy import create_engine, text

    name = f"ft_bench_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}", name


def drop_database(admin_url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


class Deployment:
    def __init__(self, work: Path, db_url: str) -> None:
        self.work = work
        self.port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
        self.env = {
            **base,
            "PYTHONPATH": str(ROOT),
            "FINETUNE_DATA_DIR": str(work / "shared"),
            "FINETUNE_DATABASE_URL": db_url,
            "FINETUNE_QUEUE_BACKEND": "redis",
            "FINETUNE_QUEUE_URL": "redis://127.0.0.1:6379/0",
            "FINETUNE_QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}",
        }
        self.db_url = db_url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        home = self.work / "hosts" / name
        home.mkdir(parents=True, exist_ok=True)
        with open(self.work / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "app.cli", *args],
                env={**self.env, "HOME": str(home)},
                cwd=home,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def query(self, sql: str, **params: Any) -> Any:
        from sqlalchemy import text

        from app.db import engine_for

        with engine_for(self.db_url).connect() as conn:
            return conn.execute(text(sql), params).first()

    def holder(self, job_id: str) -> str:
        """The name of the worker process holding the job (its pid, from the registry)."""
        row = self.query("SELECT w.pid FROM jobs j JOIN workers w ON w.id = j.worker WHERE j.id = :j", j=job_id)
        assert row is not None, job_id
        return next(name for name, p in self.procs.items() if p.pid == row[0])


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def one_round(d: Deployment, api: httpx.Client, dataset: str, kind: str) -> dict[str, float]:
    job = api.post("/api/v1/jobs", json={"dataset_id": dataset, **JOB}).json()["id"]
    run = Path(d.env["FINETUNE_DATA_DIR"]) / "runs" / job

    def state() -> dict[str, Any]:
        return api.get(f"/api/v1/jobs/{job}").json()

    wait(lambda: state()["status"] == "running" and (run / "last").exists(), 180, "a first checkpoint")
    name = d.holder(job)
    proc = d.procs[name]
    proc.send_signal(signal.SIGKILL if kind == "takeover" else signal.SIGTERM)
    t0 = time.monotonic()
    figures: dict[str, float] = {}
    deadline = t0 + 180
    # One loop for every event, each timed when it is first seen (they may come in any order).
    while "running_elsewhere" not in figures or (kind == "drain" and len(figures) < 3):
        assert time.monotonic() < deadline, f"the {kind} did not complete: {figures}"
        now_state = state()
        now = time.monotonic() - t0
        if (
            kind == "drain"
            and "requeued" not in figures
            and (now_state["status"] == "queued" or now_state["attempt"] > 1)
        ):
            figures["requeued"] = now
        if kind == "drain" and "exited" not in figures and proc.poll() is not None:
            figures["exited"] = now
        if "running_elsewhere" not in figures and now_state["attempt"] == 2 and now_state["status"] == "running":
            figures["running_elsewhere"] = now
        time.sleep(0.02)
    api.post(f"/api/v1/jobs/{job}/cancel")
    wait(lambda: state()["status"] == "cancelled", 120, "the cancel")
    proc.wait(timeout=120)
    d.start(name, "worker")
    return figures


def run(rounds: int, work: Path) -> dict[str, Any]:
    from app.db.migrate import upgrade
    from app.db.tables import User
    from app.services import auth

    db_url, db_name = create_database(PG_URL)
    d = Deployment(work, db_url)
    try:
        upgrade(db_url)
        from app.db import session_scope

        with session_scope(db_url) as s:
            admin = User(name="bench", is_admin=True)
            s.add(admin)
            s.flush()
            key = auth.issue_key(s, admin, "bench").key
        d.start("api", "serve", "--no-worker", "--port", str(d.port))
        d.start("worker-1", "worker")
        d.start("worker-2", "worker")
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{d.port}", headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        wait(lambda: _healthy(api), 120, "the API")
        wait(lambda: d.query("SELECT count(*) FROM workers WHERE stopped_at IS NULL")[0] == 2, 120, "two workers")
        r = api.post("/api/v1/datasets", files={"archive": ("d.zip", dataset_zip())}, data={"name": "bench"})
        assert r.status_code == 201, r.text
        dataset = r.json()["id"]
        takeover, drain = [], []
        for i in range(rounds):
            takeover.append(one_round(d, api, dataset, "takeover"))
            log(f"round {i + 1}: takeover {takeover[-1]['running_elsewhere']:.1f} s")
            wait(
                lambda: (
                    d.query("SELECT count(*) FROM workers WHERE stopped_at IS NULL AND lease_expires_at > now()")[0]
                    == 2
                ),
                120,
                "two live workers",
            )
            drain.append(one_round(d, api, dataset, "drain"))
            log(
                f"round {i + 1}: drain requeued {drain[-1]['requeued']:.1f} s, worker exited {drain[-1]['exited']:.1f} s"
            )
            wait(
                lambda: (
                    d.query("SELECT count(*) FROM workers WHERE stopped_at IS NULL AND lease_expires_at > now()")[0]
                    == 2
                ),
                120,
                "two live workers",
            )
        from app.settings import Settings

        defaults = Settings()
        return {
            "title": "takeover and drain",
            "rounds": rounds,
            "settings": {
                "lease_seconds": defaults.lease_seconds,
                "heartbeat_seconds": defaults.heartbeat_seconds,
                "recovery_interval_seconds": defaults.recovery_interval_seconds,
                "drain_timeout_seconds": defaults.drain_timeout_seconds,
            },
            "takeover_seconds": stats([t["running_elsewhere"] for t in takeover]),
            "drain_requeued_seconds": stats([t["requeued"] for t in drain]),
            "drain_exit_seconds": stats([t["exited"] for t in drain]),
            "drain_running_elsewhere_seconds": stats([t["running_elsewhere"] for t in drain]),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    finally:
        d.stop_all()
        from app.db import engine_for

        engine_for(db_url).dispose()
        drop_database(PG_URL, db_name)


def _healthy(api: httpx.Client) -> bool:
    try:
        return api.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def save(result: dict[str, Any], out: Path) -> None:
    """Merge into the results JSON and write the report's "Takeover and drain" section in place."""
    from bench.report import replace_section, takeover_lines

    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("machine", machine())
    results["takeover"] = result
    results_path.write_text(json.dumps(results, indent=2, default=str))
    md = ROOT / "bench" / "RESULTS.md"
    md.write_text(replace_section(md.read_text(), takeover_lines(result)))
    log(f"wrote {results_path} and {md}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.takeover", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-takeover-") as tmp:
        result = run(args.rounds, Path(tmp))
    save(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
