"""``python -m bench.load [--quick] [--clients N] [--duration S]``: the service under load while it trains.

Starts the real service (``python -m app.cli serve`` on a free loopback port, a temporary data folder), reads
the API key it prints at first start, uploads a small dataset and trains a small model through the API for a
model id, then starts a longer training job and, while it trains:

- ``--clients`` closed-loop clients post one web-sized JPEG each to predict, back to back, for ``--duration``;
- a separate process polls ``/healthz`` every 100 ms (its own process, so the load generator's event loop
  does not add to what it measures);
- a few dataset zips are uploaded at once a third of the way in (uploads must not block the event loop);
- the API process's resident memory is sampled (``/proc/PID/status``).

It records predict requests, errors, requests/s, p50/p99 latency; ``/healthz`` p50/p99 (target: p99 under
200 ms), also while the uploads ran; the upload times; RSS at the start, the end and its peaks; and whether
the training job kept progressing. Results go under ``"load"`` in ``bench/out/results.json`` (other keys
kept; ``--quick`` writes ``results.quick.json``), and ``bench/RESULTS.md`` is written again from it.
Loopback only, bounded in time (the whole run stops after ``--timeout`` seconds). Exit code 1 when a
request failed, the health target was missed or the training job stalled.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, free_port, machine, service_env, wait_http
from bench.data import make_dataset, make_photo, make_zip

OUT = ROOT / "bench" / "out"
HEALTH_INTERVAL = 0.1
HEALTH_TARGET_MS = 200.0
KEY_LINE = re.compile(r"^\s+(ft_[A-Za-z0-9_\-]{20,})\s*$")
FINISHED = ("succeeded", "failed", "cancelled")


def log(msg: str) -> None:
    print(msg, flush=True)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


# -- the service --------------------------------------------------------------------------------------------


class Service:
    """``python -m app.cli serve`` in its own process group; its output goes to a log, and the first-start API
    key is read from it on the way."""

    def __init__(self, data: Path, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = service_env(data)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._key: str | None = None
        self._got_key = threading.Event()
        self._drainer = threading.Thread(target=self._drain, args=(log_path,), daemon=True)
        self._drainer.start()

    def _drain(self, log_path: Path) -> None:
        # Read everything: a full pipe would block the service.
        assert self.proc.stdout is not None
        with open(log_path, "wb") as f:
            for line in self.proc.stdout:
                f.write(line)
                m = KEY_LINE.match(line.decode(errors="replace"))
                if m and self._key is None:
                    self._key = m.group(1)
                    self._got_key.set()
        self._got_key.set()

    def key(self, timeout: float = 120.0) -> str:
        if not self._got_key.wait(timeout) or self._key is None:
            raise RuntimeError("serve did not print a first-start API key (is the data folder new?)")
        return self._key

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM of the API process (uvicorn runs in the serve process itself)."""
        found: dict[str, int] = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line.split(":")[0]] = int(line.split()[1])
        except OSError:
            pass
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # serve stops its worker, which takes its job process along
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._drainer.join(timeout=5)


# -- setting up ---------------------------------------------------------------------------------------------


def zip_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.rglob("*.jpg")):
            zf.write(f, f.relative_to(folder))
    return buf.getvalue()


def wait_job(client: httpx.Client, job_id: str, done: Callable[[dict[str, Any]], bool], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/api/v1/jobs/{job_id}").json()
        if done(job):
            return job
        if job["status"] in FINISHED:
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not get there in {timeout:.0f}s: {job['status']}, {job['message']}")
        time.sleep(0.5)


# -- the load -----------------------------------------------------------------------------------------------


def poll_health(url: str, start_at: float, stop_at: float, interval: float, conn: Connection) -> None:
    """In its own process: GET ``url`` every ``interval`` from ``start_at`` to ``stop_at`` (monotonic clock,
    shared by every process on Linux); sends [(sent at, seconds or None for an error)]."""
    samples: list[tuple[float, float | None]] = []
    with httpx.Client(timeout=5.0) as client:
        time.sleep(max(0.0, start_at - time.monotonic()))
        tick = start_at
        while tick < stop_at:
            t0 = time.monotonic()
            try:
                ok = client.get(url).status_code == 200
            except httpx.HTTPError:
                ok = False
            samples.append((t0, time.monotonic() - t0 if ok else None))
            tick += interval
            time.sleep(max(0.0, tick - time.monotonic()))
    conn.send(samples)
    conn.close()


async def drive(
    service: Service,
    headers: dict[str, str],
    model_id: str,
    image: bytes,
    clients: int,
    duration: float,
    uploads: list[bytes],
) -> dict[str, Any]:
    base = service.base
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    start = time.monotonic() + 1.0  # the poller process is up by then
    stop_at = start + duration
    poller = ctx.Process(
        target=poll_health, args=(f"{base}/healthz", start, stop_at, HEALTH_INTERVAL, send), daemon=True
    )
    poller.start()
    send.close()

    latencies: list[float] = []
    failures: Counter[str] = Counter()
    memory: list[tuple[float, int]] = []
    upload_runs: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    url = f"/api/v1/models/{model_id}/predict"

    async with (
        httpx.AsyncClient(base_url=base, headers=headers, timeout=60.0, limits=limits) as predict,
        httpx.AsyncClient(base_url=base, headers=headers, timeout=600.0) as uploader,
    ):

        async def one_client() -> None:
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                try:
                    r = await predict.post(url, files={"images": ("photo.jpg", image, "image/jpeg")})
                    failure = None if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    failure = type(e).__name__
                if failure is None:
                    latencies.append(time.monotonic() - t0)
                else:
                    failures[failure] += 1

        async def sample_memory() -> None:
            while time.monotonic() < stop_at:
                kb = service.memory_kb().get("VmRSS")
                if kb:
                    memory.append((time.monotonic() - start, kb))
                await asyncio.sleep(0.25)

        async def upload(i: int, archive: bytes) -> None:
            await asyncio.sleep(max(0.0, start + duration / 3 - time.monotonic()))
            t0 = time.monotonic()
            try:
                r = await uploader.post(
                    "/api/v1/datasets", files={"archive": (f"upload-{i}.zip", archive)}, data={"name": f"upload-{i}"}
                )
                status: int | str = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            upload_runs.append({"started": t0 - start, "seconds": time.monotonic() - t0, "status": status})

        await asyncio.sleep(max(0.0, start - time.monotonic()))
        await asyncio.gather(
            *(one_client() for _ in range(clients)),
            sample_memory(),
            *(upload(i, archive) for i, archive in enumerate(uploads)),
        )
    elapsed = time.monotonic() - start  # requests in flight at stop_at finish after it
    health: list[tuple[float, float | None]] = await asyncio.to_thread(receive.recv)
    poller.join(timeout=10)

    health_ok = [s for _, s in health if s is not None]
    during = [
        s
        for t, s in health
        if s is not None and any(start + u["started"] <= t <= start + u["started"] + u["seconds"] for u in upload_runs)
    ]
    half = duration / 2
    p99 = ms(pct(health_ok, 0.99))
    return {
        "predict": {
            "requests": len(latencies),
            "errors": sum(failures.values()),
            "error_kinds": dict(failures),
            "rps": len(latencies) / elapsed,
            "p50_ms": ms(pct(latencies, 0.50)),
            "p99_ms": ms(pct(latencies, 0.99)),
            "max_ms": ms(max(latencies, default=0.0)),
        },
        "healthz": {
            "polls": len(health),
            "errors": len(health) - len(health_ok),
            "p50_ms": ms(pct(health_ok, 0.50)),
            "p99_ms": p99,
            "max_ms": ms(max(health_ok, default=0.0)),
            "during_uploads": {"polls": len(during), "p99_ms": ms(pct(during, 0.99))},
            "over_100_ms": sum(s > 0.1 for s in health_ok),
            "slowest": [
                {"at_s": round(t - start, 2), "ms": round(s * 1000, 1)}
                for t, s in sorted(((t, s) for t, s in health if s is not None), key=lambda x: -x[1])[:5]
            ],
            "target": {
                "goal": f"p99 < {HEALTH_TARGET_MS:.0f} ms",
                "met": p99 is not None and p99 < HEALTH_TARGET_MS and len(health_ok) == len(health),
            },
        },
        "uploads": sorted(upload_runs, key=lambda u: u["started"]),
        "rss_mb": {
            "start": memory[0][1] / 1024 if memory else None,
            "end": memory[-1][1] / 1024 if memory else None,
            "peak": max(kb for _, kb in memory) / 1024 if memory else None,
            "peak_first_half": max((kb for t, kb in memory if t < half), default=0) / 1024,
            "peak_second_half": max((kb for t, kb in memory if t >= half), default=0) / 1024,
            "samples": len(memory),
        },
    }


# -- the run ------------------------------------------------------------------------------------------------


def run(quick: bool, clients: int, duration: float, work: Path) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="load-", dir=work))
    loadavg = os.getloadavg()
    arch = "lenet" if quick else "resnet18"
    model_config: dict[str, Any] = {"model": arch, "weights": "none", "epochs": 1}
    long_config: dict[str, Any] = {"model": arch, "weights": "none", "epochs": 1000 if quick else 200}
    upload_count, upload_images = (2, 60) if quick else (3, 300)
    service = Service(data / "data", work / "logs" / "load-serve.log")
    try:
        headers = {"Authorization": f"Bearer {service.key()}"}
        wait_http(f"{service.base}/healthz")
        mem_idle = service.memory_kb()
        with httpx.Client(base_url=service.base, headers=headers, timeout=600) as api:
            small = make_dataset(work / "load-small", classes=3, train_per_class=12, val_per_class=4, seed=5)
            r = api.post("/api/v1/datasets", files={"archive": ("small.zip", zip_of(small))}, data={"name": "small"})
            r.raise_for_status()
            dataset_id = r.json()["id"]
            t0 = time.monotonic()
            job = api.post("/api/v1/jobs", json={"dataset_id": dataset_id, **model_config}).json()
            job = wait_job(api, job["id"], lambda j: j["status"] == "succeeded", timeout=900)
            model_id = job["model_id"]
            log(f"  trained {arch} (1 epoch) in {time.monotonic() - t0:.0f}s: model {model_id}")
            image = make_photo("circle", random.Random(7))
            t0 = time.monotonic()
            api.post(f"/api/v1/models/{model_id}/predict", files={"images": ("a.jpg", image)}).raise_for_status()
            first_predict = time.monotonic() - t0

            long_job = api.post("/api/v1/jobs", json={"dataset_id": dataset_id, **long_config}).json()
            # Under load from its first batch: wait until it trains (past start-up and its data pass).
            wait_job(api, long_job["id"], lambda j: j["message"].startswith("epoch"), timeout=600)
            before = api.get(f"/api/v1/jobs/{long_job['id']}").json()
            uploads = [
                make_zip(work / f"load-upload-{upload_images}-{i}.zip", images=upload_images, classes=3, seed=10 + i)
                for i in range(upload_count)
            ]
            log(f"  {clients} clients predicting for {duration:.0f}s while job {long_job['id']} trains")
            results = asyncio.run(
                drive(service, headers, model_id, image, clients, duration, [u.read_bytes() for u in uploads])
            )
            after = api.get(f"/api/v1/jobs/{long_job['id']}").json()
            api.post(f"/api/v1/jobs/{long_job['id']}/cancel")
        progressed = after["status"] == "running" and after["progress"] > before["progress"]
        results.update(
            {
                "title": f"load: {clients} clients predicting for {duration:.0f} s while a {arch} job trains, "
                f"{upload_count} dataset uploads at once",
                "quick": quick,
                "clients": clients,
                "duration_s": duration,
                "model": f"{arch}, random init, 1 epoch; one {len(image) // 1024} KB 400x300 JPEG per request",
                "first_predict_s": first_predict,
                "upload_images": upload_images,
                "upload_mb": round(uploads[0].stat().st_size / 1e6, 1),
                "training": {
                    "job": long_job["id"],
                    "epoch_before": before["epoch"],
                    "epoch_after": after["epoch"],
                    "progress_before": before["progress"],
                    "progress_after": after["progress"],
                    "message_after": after["message"],
                    "kept_progressing": progressed,
                },
                "rss_idle_mb": mem_idle.get("VmRSS", 0) / 1024,
                "rss_hwm_mb": service.memory_kb().get("VmHWM", 0) / 1024,
                "loadavg_before": [round(x, 2) for x in loadavg],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],  # other work on the machine shows here
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        return results
    finally:
        service.stop()
        shutil.rmtree(data, ignore_errors=True)


def summary(r: dict[str, Any]) -> list[str]:
    p, h, m, t = r["predict"], r["healthz"], r["rss_mb"], r["training"]
    uploads = ", ".join(f"{u['status']} in {u['seconds']:.1f}s" for u in r["uploads"])
    return [
        f"  predict: {p['requests']} requests, {p['errors']} errors, {p['rps']:.1f} req/s, "
        f"p50 {p['p50_ms']:.0f} ms, p99 {p['p99_ms']:.0f} ms",
        f"  /healthz: {h['polls']} polls, {h['errors']} errors, p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms "
        f"(during uploads {h['during_uploads']['p99_ms'] or float('nan'):.1f} ms): target {h['target']['goal']} "
        f"{'met' if h['target']['met'] else 'NOT met'}",
        f"  uploads: {uploads}",
        f"  API RSS: {m['start']:.0f} MB at the start, {m['end']:.0f} MB at the end, peak {m['peak']:.0f} MB "
        f"(first half {m['peak_first_half']:.0f}, second half {m['peak_second_half']:.0f})",
        f"  training: epoch {t['epoch_before']} -> {t['epoch_after']}, progress {t['progress_before']:.3f} -> "
        f"{t['progress_after']:.3f} ({'kept progressing' if t['kept_progressing'] else 'STALLED'})",
    ]


def save(result: dict[str, Any], out: Path, quick: bool) -> None:
    """Merge ``result`` into the results JSON under "load" and write the markdown report again."""
    from bench.report import write_markdown

    results_path = out / ("results.quick.json" if quick else "results.json")
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("machine", machine())
    # The report's header names the data and the time; `python -m bench` sets them for its own benchmarks.
    results.setdefault("data", "bench.load: generated 400x300 JPEG shapes (3 classes)")
    results.setdefault("finished_at", result["finished_at"])
    results["load"] = result
    results_path.write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {results_path}")
    try:
        md = write_markdown(results, out / "RESULTS.quick.md" if quick else ROOT / "bench" / "RESULTS.md")
        log(f"wrote {md}")
    except (KeyError, TypeError) as e:  # another benchmark's section in an older format
        log(f"the markdown report was not written: {type(e).__name__} {e} (run its benchmark again)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke check: 16 clients for 10 s, LeNet")
    parser.add_argument("--clients", type=int, help="concurrent predict clients (default 64, quick 16)")
    parser.add_argument("--duration", type=float, help="seconds of load (default 60, quick 10)")
    parser.add_argument("--timeout", type=float, default=1800, help="stop the whole run after this many seconds")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    clients = args.clients or (16 if args.quick else 64)
    duration = args.duration or (10.0 if args.quick else 60.0)
    work = args.out / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)

    def too_long(*_: Any) -> None:
        raise TimeoutError(f"the load run took more than {args.timeout:.0f}s")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(int(args.timeout))
    try:
        log(f"load (load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())})")
        result = run(args.quick, clients, duration, work)
    finally:
        signal.alarm(0)
    for line in summary(result):
        log(line)

    save(result, args.out, args.quick)
    ok = (
        result["predict"]["errors"] == 0
        and result["healthz"]["target"]["met"]
        and result["training"]["kept_progressing"]
        and all(u["status"] == 201 for u in result["uploads"])
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
