"""Service benchmarks: ingest, startup and prediction, with the real service in its own processes.

- ingest: upload + verification of a 2,000-image zip (images/s).
- startup: from starting `serve` to the first answered predict (model load included).
- predict: our endpoint against a naive FastAPI endpoint (batch 1 per request) on the same checkpoint, at
  concurrency 1, 8 and 32, alternating arms; requests/s, p50/p99 latency, and the batch sizes our
  micro-batcher formed (from its Prometheus histogram).
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    admin_key,
    free_port,
    ratio,
    service_env,
    start_process,
    stop_process,
    train_through_api,
    wait_http,
)
from bench.data import make_photo, make_zip
from bench.loadgen import run_load


def _batch_histogram(base: str, auth: dict[str, str]) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", headers=auth, timeout=10).text
    buckets: dict[str, float] = {}
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("finetune_predict_batch_size_bucket"):
            m = re.search(r'le="([^"]+)"\}\s+([0-9.e+]+)', line)
            if m:
                buckets[m.group(1)] = float(m.group(2))
        elif line.startswith("finetune_predict_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("finetune_predict_batch_size_count"):
            count = float(line.split()[-1])
    return {"sum": total, "count": count, **{f"le_{k}": v for k, v in buckets.items()}}


def _batch_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    forwards = after["count"] - before["count"]
    images = after["sum"] - before["sum"]
    dist = {k[3:]: after[k] - before.get(k, 0.0) for k in after if k.startswith("le_")}
    return {
        "forward_passes": forwards,
        "mean_batch": images / forwards if forwards else None,
        "cumulative_buckets": dist,
    }


def _train_model(base: str, auth: dict[str, str], work: Path, log: Any) -> tuple[str, str]:
    """A resnet18 (random init, 1 epoch at 224 px) trained through the API; returns (model id, job id)."""
    from bench.data import make_dataset, zip_folder

    small = make_dataset(work / "small", classes=3, train_per_class=12, val_per_class=4, seed=5)
    return train_through_api(base, auth, zip_folder(small), "bench-small", "the benchmark model", log, timeout=600)


def service(
    work: Path, *, ingest_images: int, durations: float, concurrencies: tuple[int, ...], log: Any
) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="bench-svc-", dir=work))
    env = service_env(data)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    auth = {"Authorization": f"Bearer {admin_key(env)}"}
    proc = start_process(["-m", "app.cli", "serve", "--port", str(port)], env, work / "logs" / "serve.log")
    try:
        wait_http(f"{base}/healthz")
        # -- ingest
        archive = make_zip(work / f"ingest-{ingest_images}.zip", images=ingest_images)
        t0 = time.perf_counter()
        r = httpx.post(
            f"{base}/api/v1/datasets",
            content=archive.read_bytes(),
            headers={"Content-Type": "application/zip", **auth},
            params={"name": "ingest"},
            timeout=1800,
        )
        r.raise_for_status()
        elapsed = time.perf_counter() - t0
        results["ingest"] = {
            "title": f"ingest: upload + verification of a {ingest_images}-image zip",
            "images": r.json()["num_images"],
            "seconds": elapsed,
            "images_per_sec": r.json()["num_images"] / elapsed,
            "zip_mb": archive.stat().st_size / 1e6,
        }
        log(f"  ingest: {results['ingest']['images_per_sec']:.0f} images/s ({elapsed:.1f}s)")
        model_id, job_id = _train_model(base, auth, work, log)
    finally:
        stop_process(proc)

    # -- startup: a fresh serve process until the first predict is answered
    image = make_photo("circle", random.Random(7))
    t0 = time.perf_counter()
    proc = start_process(["-m", "app.cli", "serve", "--port", str(port)], env, work / "logs" / "serve2.log")
    naive = None
    try:
        wait_http(f"{base}/healthz")
        up = time.perf_counter() - t0
        while True:
            try:
                r = httpx.post(
                    f"{base}/api/v1/models/{model_id}/predict",
                    files={"images": ("a.jpg", image)},
                    headers=auth,
                    timeout=60,
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        results["startup"] = {
            "title": "startup: `serve` to the first answered predict",
            "seconds_to_healthz": up,
            "seconds_to_first_predict": time.perf_counter() - t0,
        }
        log(
            f"  startup: healthz after {up:.1f}s, first predict after {results['startup']['seconds_to_first_predict']:.1f}s"
        )

        # -- predict: ours vs naive, alternating per concurrency level
        naive_port = free_port()
        run_dir = data / "runs" / job_id
        naive = start_process(
            ["-m", "bench.naive_server", str(run_dir), "--port", str(naive_port)], env, work / "logs" / "naive.log"
        )
        wait_http(f"http://127.0.0.1:{naive_port}/healthz")
        ours_url = f"{base}/api/v1/models/{model_id}/predict"
        naive_url = f"http://127.0.0.1:{naive_port}/predict"
        results["predict"] = []
        payloads = {"web": image, "photo": make_photo("circle", random.Random(8), size=(1600, 1200))}
        for payload, data_bytes in payloads.items():
            rows = []
            for i, c in enumerate(concurrencies):
                arms = ("ours", "naive") if i % 2 == 0 else ("naive", "ours")
                row: dict[str, Any] = {"concurrency": c}
                for arm in arms:
                    if arm == "ours":
                        before = _batch_histogram(base, auth)
                        row["ours"] = run_load(
                            ours_url, "images", data_bytes, concurrency=c, duration=durations, headers=auth
                        )
                        row["ours"]["batches"] = _batch_delta(before, _batch_histogram(base, auth))
                    else:
                        row["naive"] = run_load(naive_url, "file", data_bytes, concurrency=c, duration=durations)
                row["rps_ratio"] = ratio(row["ours"]["rps"], row["naive"]["rps"])
                row["p99_ratio"] = ratio(row["ours"]["p99_ms"], row["naive"]["p99_ms"])
                rows.append(row)
                log(
                    f"  predict {payload} c={c}: ours {row['ours']['rps']:.1f} req/s p99 {row['ours']['p99_ms']:.0f} ms "
                    f"(mean batch {row['ours']['batches']['mean_batch']}); naive {row['naive']['rps']:.1f} req/s "
                    f"p99 {row['naive']['p99_ms']:.0f} ms"
                )
            top = rows[-1]
            w, h = (400, 300) if payload == "web" else (1600, 1200)
            results["predict"].append(
                {
                    "title": f"predict, resnet18 at 224 px, {w}x{h} JPEG ({len(data_bytes) // 1024} KB): our endpoint vs a "
                    "naive FastAPI endpoint (batch 1)",
                    "payload": payload,
                    "rows": rows,
                    "targets": {
                        "rps_at_max_concurrency": {
                            "goal": ">= 2x requests/s with p99 no worse",
                            "met": top["rps_ratio"] >= 2 and top["p99_ratio"] <= 1.0,
                        }
                    },
                }
            )
    finally:
        if naive is not None:
            stop_process(naive)
        stop_process(proc)
    return results
