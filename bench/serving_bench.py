"""Serving benchmark (``python -m bench serving``): our predict endpoint beside TorchServe and a naive FastAPI
endpoint, in one run, on the same weights and images; and the export parity table.

- predict: the real service (``serve``) with a resnet18 trained through its API at 224 px, raw JPEG bodies;
  TorchServe 0.12 with the same weights (``bench/torchserve_handler.py``: torchvision transforms, eager
  float32), registered twice, batched (batch 8, 10 ms) and unbatched, one worker each; the naive endpoint
  (``bench/naive_server.py``, multipart, batch 1). Closed loop at 1 / 8 / 32 clients for three JPEG sizes,
  64 distinct images each; arms alternate within every cell. Then the same model served in int8 (its
  accuracy change on its test split measured first, as the API requires) and, for 400x300, two uvicorn
  workers instead of one process.
- parity: resnet18 and googlenet, pretrained here on other shapes and fine-tuned (frozen backbone, 64 px, the
  backbones' own size) on four shapes with a 280-image test split; each exported as ONNX, TorchScript and int8 ONNX with its check
  (top-1 agreement, max probability difference, accuracy change on the test split), and each serving runtime
  measured at batch 8 on this machine.
"""

from __future__ import annotations

import random
import subprocess
import tempfile
import time
from collections.abc import Callable
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
from bench.data import SHAPES, make_photo, make_split_dataset, zip_folder
from bench.loadgen import run_load, run_rounds

SIZES = {"small": (224, 224), "web": (400, 300), "photo": (1600, 1200)}
POOL = 64  # distinct images per size
ARMS = ("ours", "torchserve_batched", "torchserve", "naive")
TARGETS = {
    "ours_vs_torchserve_batched_32": 1.5,
    "ours_vs_naive_32": 2.0,
    "ours_vs_torchserve_1": 1.2,
    "p99_32_ms": 500.0,
    "int8_vs_torchserve_batched_32": 2.5,
    "int8_accuracy_change_points": -0.5,
}


# -- the service --------------------------------------------------------------------------------------------
def train_served_model(base: str, auth: dict[str, str], work: Path, quick: bool, log: Any) -> tuple[str, str]:
    """A resnet18 (random init, 224 px) trained through the API on shapes with a test split."""
    data = make_split_dataset(
        # 64 test images per class: one image changed by int8 is 0.39 points (the target is <= 0.5), not 1.56
        work / ("served-quick" if quick else "served"),
        per_split=(8, 4, 6) if quick else (24, 8, 64),
    )
    return train_through_api(base, auth, zip_folder(data), "bench-serving", "the served model", log, timeout=900)


def wait_runtime(base: str, auth: dict[str, str], model_id: str, image: bytes, timeout: float = 600) -> dict[str, Any]:
    """Predict once (loading the model), then wait until the service has chosen its runtime."""
    url = f"{base}/api/v1/models/{model_id}/predict"
    httpx.post(url, content=image, headers={"Content-Type": "image/jpeg", **auth}, timeout=120).raise_for_status()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        serving = httpx.get(f"{base}/api/v1/models/{model_id}", headers=auth, timeout=30).json()["serving"]
        loaded = serving.get("loaded_here")
        if loaded and not loaded["choosing"]:
            return dict(serving)
        time.sleep(0.5)
    raise TimeoutError("the service did not choose a runtime")


def set_int8(base: str, auth: dict[str, str], model_id: str) -> dict[str, Any]:
    """Measure the int8 model's accuracy change (the API's precondition), then serve int8."""
    r = httpx.post(
        f"{base}/api/v1/models/{model_id}/exports", params={"format": "onnx-int8"}, headers=auth, timeout=900
    )
    r.raise_for_status()
    httpx.put(
        f"{base}/api/v1/models/{model_id}/serving", json={"precision": "int8"}, headers=auth, timeout=60
    ).raise_for_status()
    return dict(r.json()["parity"])


def image_pools(quick: bool) -> dict[str, list[bytes]]:
    rng = random.Random(21)
    n = 8 if quick else POOL
    sizes = {"web": SIZES["web"]} if quick else SIZES
    return {name: [make_photo(SHAPES[i % 4], rng, size) for i in range(n)] for name, size in sizes.items()}


def start_workers(env: dict[str, str], port: int, workers: int, log_path: Path) -> subprocess.Popen[bytes]:
    """The API alone under uvicorn with ``workers`` processes (each with its own model cache and batcher, and
    its share of the cores for its forward passes)."""
    from finetune.serving import usable_cpus

    env = {**env, "FINETUNE_PREDICT_THREADS": str(max(1, usable_cpus() // workers))}
    return start_process(
        [
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        ],
        env,
        log_path,
    )


def window(
    url: str, field: str | None, headers: dict[str, str], images: list[bytes], concurrency: int
) -> Callable[[float, float], dict[str, Any]]:
    """One server's load for ``run_rounds``: a closed-loop window of the given seconds after a warm-up."""

    def load(seconds: float, warmup: float) -> dict[str, Any]:
        return run_load(
            url, field, images, concurrency=concurrency, duration=seconds, warmup=warmup, headers=headers, keep_raw=True
        )

    return load


def predict_table(
    work: Path,
    *,
    quick: bool,
    duration: float,
    rounds: int,
    concurrencies: tuple[int, ...],
    torchserve: bool,
    log: Any,
) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="bench-serving-", dir=work))
    env = service_env(data)
    auth = {"Authorization": f"Bearer {admin_key(env)}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    ts = None
    # Each cell's seconds in `rounds` windows, each after its own warm-up (new connections, a queue to fill).
    warmup = 2.0 if rounds == 1 else 1.5
    result: dict[str, Any] = {
        "duration_s": duration,
        "rounds": rounds,
        "warmup_s": warmup,
        "concurrencies": list(concurrencies),
    }
    try:
        serve = start_process(["-m", "app.cli", "serve", "--port", str(port)], env, work / "logs" / "serving.log")
        procs.append(serve)
        wait_http(f"{base}/healthz")
        model_id, job_id = train_served_model(base, auth, work, quick, log)
        run_dir = data / "runs" / job_id
        pools = image_pools(quick)
        result["served"] = fp32 = wait_runtime(base, auth, model_id, pools["web"][0])
        log(f"  our service serves it with {fp32['loaded_here']['runtime']}: {fp32['measured']}")
        urls: dict[str, tuple[str, str | None, dict[str, str]]] = {
            "ours": (f"{base}/api/v1/models/{model_id}/predict", None, auth)
        }
        naive_port = free_port()
        procs.append(
            start_process(
                ["-m", "bench.naive_server", str(run_dir), "--port", str(naive_port)], env, work / "logs" / "naive.log"
            )
        )
        wait_http(f"http://127.0.0.1:{naive_port}/healthz")
        urls["naive"] = (f"http://127.0.0.1:{naive_port}/predict", "file", {})
        if torchserve:
            ts, ts_urls = start_torchserve(run_dir, work, log)
            urls.update({k: (u, None, {}) for k, u in ts_urls.items()})
        arms = [a for a in ARMS if a in urls]
        result["arms"] = arms
        result["sizes"] = {}
        for size, images in pools.items():
            rows = []
            for i, c in enumerate(concurrencies):
                order = arms[i % len(arms) :] + arms[: i % len(arms)]  # each arm leads in turn
                loads = {arm: window(*urls[arm], images, c) for arm in order}
                row: dict[str, Any] = {
                    "concurrency": c,
                    **run_rounds(loads, duration=duration, rounds=rounds, warmup=warmup),
                }
                rows.append(row)
                log(
                    f"  {size} c={c}: "
                    + ", ".join(f"{a} {row[a]['rps']:.1f} req/s p99 {row[a]['p99_ms']:.0f} ms" for a in arms)
                )
            result["sizes"][size] = {
                "image": list(SIZES[size]),
                "kb": sum(map(len, images)) // len(images) // 1024,
                "rows": rows,
            }
        # int8: the same model, its accuracy change measured first (the API refuses int8 otherwise)
        result["int8_check"] = set_int8(base, auth, model_id)
        result["served_int8"] = wait_runtime(base, auth, model_id, pools["web"][0])
        log(
            f"  int8: accuracy change {result['int8_check']['accuracy_change_points']} points; runtime "
            f"{result['served_int8']['loaded_here']['runtime']}"
        )
        for size, images in pools.items():
            for row in result["sizes"][size]["rows"]:
                load = window(*urls["ours"], images, row["concurrency"])
                row["ours_int8"] = run_rounds({"int8": load}, duration=duration, rounds=rounds, warmup=warmup)["int8"]
                log(f"  {size} c={row['concurrency']}: ours int8 {row['ours_int8']['rps']:.1f} req/s")
        if not quick:
            result["workers"] = compare_workers(
                env, auth, model_id, pools["web"], concurrencies, duration, rounds, warmup, work, serve, log
            )
    finally:
        if ts is not None:
            ts.stop()
        for p in procs:
            stop_process(p)
    result["ratios"] = ratios(result)
    return result


def compare_workers(
    env: dict[str, str],
    auth: dict[str, str],
    model_id: str,
    images: list[bytes],
    concurrencies: tuple[int, ...],
    duration: float,
    rounds: int,
    warmup: float,
    work: Path,
    serve: subprocess.Popen[bytes],
    log: Any,
) -> dict[str, Any]:
    """Our API as one process (the batcher sees every request) against two uvicorn workers (each with its own
    model and batcher), int8 as set above. Both run at once, idle but for the one being measured, taking turns
    window by window as the servers above do."""
    stop_process(serve)  # its worker too: only the API is measured
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    try:
        for workers in (1, 2):  # one after the other: each measures its runtimes with the cores to itself
            port = free_port()
            procs.append(start_workers(env, port, workers, work / "logs" / f"uvicorn-{workers}.log"))
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/healthz")
            for _ in range(workers * 4):  # every worker loads the model and chooses its runtime
                wait_runtime(base, auth, model_id, images[0])
            urls[str(workers)] = f"{base}/api/v1/models/{model_id}/predict"
        out: dict[str, Any] = {name: [] for name in urls}
        for c in concurrencies:
            loads = {name: window(url, None, auth, images, c) for name, url in urls.items()}
            for name, figure in run_rounds(loads, duration=duration, rounds=rounds, warmup=warmup).items():
                out[name].append(figure)
        for name, figures in out.items():
            log(f"  {name} uvicorn worker(s): " + ", ".join(f"c={r['concurrency']} {r['rps']:.1f}" for r in figures))
    finally:
        for proc in procs:
            stop_process(proc)
    return out


def start_torchserve(run_dir: Path, work: Path, log: Any) -> tuple[Any, dict[str, str]]:
    from bench.torchserve import TorchServe, ensure_env, make_archive, unavailable

    why = unavailable()
    if why:
        raise RuntimeError(f"TorchServe cannot run here: {why} (or pass --no-torchserve)")
    venv = ensure_env(log)
    store = Path(tempfile.mkdtemp(prefix="ts-store-", dir=work))
    archive = make_archive(venv, run_dir, store, "resnet18")
    ts = TorchServe(venv, store, work / "logs" / "torchserve")
    ts.start()
    try:
        urls = {
            "torchserve_batched": ts.register(archive, "batched", batch_size=8, max_batch_delay_ms=10),
            "torchserve": ts.register(archive, "single", batch_size=1, max_batch_delay_ms=10),
        }
    except BaseException:
        ts.stop()
        raise
    log(f"  TorchServe 0.12 up ({venv.name}): batched (8 / 10 ms) and unbatched, one worker each")
    return ts, urls


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Per size, the issue's targets at the lowest and highest concurrency."""
    out: dict[str, Any] = {}
    for size, table in result.get("sizes", {}).items():
        rows = table["rows"]
        low, high = rows[0], rows[-1]
        r: dict[str, Any] = {"low_clients": low["concurrency"], "high_clients": high["concurrency"]}
        r["p99_high_ms"] = high["ours"]["p99_ms"]
        r["ours_vs_naive_high"] = ratio(high["ours"]["rps"], high["naive"]["rps"])
        r["int8_vs_naive_high"] = ratio(high["ours_int8"]["rps"], high["naive"]["rps"]) if "ours_int8" in high else None
        if "torchserve_batched" in high:
            r["ours_vs_torchserve_batched_high"] = ratio(high["ours"]["rps"], high["torchserve_batched"]["rps"])
            r["ours_vs_torchserve_low"] = ratio(low["ours"]["rps"], low["torchserve"]["rps"])
            if "ours_int8" in high:
                r["int8_vs_torchserve_batched_high"] = ratio(
                    high["ours_int8"]["rps"], high["torchserve_batched"]["rps"]
                )
        out[size] = r
    return out


# -- exports: parity and runtimes ---------------------------------------------------------------------------
def parity_table(work: Path, *, archs: tuple[str, ...], quick: bool, log: Any) -> dict[str, Any]:
    from bench.train_bench import pretrained_weights
    from finetune.config import TrainConfig
    from finetune.export import FORMATS, export_run
    from finetune.predict import Predictor
    from finetune.serving import select_runtime
    from finetune.train import train

    data = make_split_dataset(
        work / ("parity-quick" if quick else "parity"), per_split=(8, 4, 6) if quick else (60, 20, 70)
    )
    out: dict[str, Any] = {"test_images": 6 * 4 if quick else 70 * 4, "archs": {}}
    for arch in archs:
        weights = "none" if quick else str(pretrained_weights(arch, work, log))
        run = Path(tempfile.mkdtemp(prefix=f"parity-{arch}-", dir=work)) / "run"
        t0 = time.perf_counter()
        result = train(
            TrainConfig(
                data=str(data),
                out=str(run),
                model=arch,
                weights=weights,
                strategy="frozen",
                epochs=2 if quick else 10,
                # The backbone's own size: features pretrained at 64 px do not transfer to 224 px crops (a frozen
                # resnet18 reached 0.32 on 4 classes there), and an accuracy change needs a model that works.
                image_size=64,
                cache_dir=str(run.parent / "cache"),
                device="cpu",
            )
        )
        row: dict[str, Any] = {"test_top1": result.evaluation.get("test", {}).get("top1"), "formats": {}}
        log(f"  {arch}: trained (frozen, {time.perf_counter() - t0:.0f} s), test top-1 {row['test_top1']}")
        for fmt in FORMATS:
            t0 = time.perf_counter()
            export = export_run(run, fmt)
            row["formats"][fmt] = {
                **export.parity,
                "seconds": time.perf_counter() - t0,
                "bytes": export.path.stat().st_size,
            }
            log(f"  {arch} {fmt}: {export.parity}")
        predictor = Predictor.from_run(run, device="cpu")
        row["runtimes"] = {}
        for precision in ("fp32", "int8"):
            choice = select_runtime(
                predictor,
                run,
                precision=precision,
                batch=8,
                seconds=0.5 if quick else 3.0,
                try_compile=not quick,
                remeasure=True,
            )
            row["runtimes"][precision] = choice.measured
        log(f"  {arch} runtimes at batch 8: {row['runtimes']}")
        out["archs"][arch] = row
    return out


def serving(
    work: Path,
    *,
    quick: bool,
    duration: float,
    concurrencies: tuple[int, ...],
    torchserve: bool,
    archs: tuple[str, ...],
    log: Any,
    rounds: int = 1,
) -> dict[str, Any]:
    log("serving: export parity and runtimes")
    parity = parity_table(work, archs=archs, quick=quick, log=log)
    log("serving: predict, ours vs TorchServe vs naive")
    predict = predict_table(
        work,
        quick=quick,
        duration=duration,
        rounds=rounds,
        concurrencies=concurrencies,
        torchserve=torchserve,
        log=log,
    )
    return {"parity": parity, "predict": predict, "quick": quick}
