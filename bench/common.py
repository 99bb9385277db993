"""Shared helpers: timing statistics, machine description, free ports, subprocess servers."""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated measurements."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(ours: float, ref: float) -> float:
    return ours / ref if ref else float("inf")


def machine() -> dict[str, Any]:
    import torch
    import torchvision

    from finetune.serving import cpu_description

    cpu, features = cpu_description()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_features": features,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def service_env(data: Path) -> dict[str, str]:
    """The environment of a benchmarked ``serve``: our data folder, quiet logs, no inherited FINETUNE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env.update(
        {
            "FINETUNE_DATA_DIR": str(data),
            "FINETUNE_LOG_LEVEL": "WARNING",
            # One user sends every request here: the per-user predict limit would answer 429.
            "FINETUNE_RATE_LIMIT_PREDICT_PER_MINUTE": "0",
        }
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120.0) -> float:
    """Poll ``url`` until it answers 2xx; returns the seconds waited."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code < 300:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def admin_key(env: dict[str, str]) -> str:
    """Migrate the new data folder and create an admin: its API key authorises every benchmark request."""
    run = [sys.executable, "-m", "app.cli"]
    subprocess.run([*run, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
    out = subprocess.run(
        [*run, "users", "create", "bench", "--admin"], env=env, cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    keys = [line.strip() for line in out.splitlines() if line.strip().startswith("ft_")]
    if not keys:
        raise RuntimeError(f"`users create` printed no API key: {out!r}")
    return keys[-1]


def train_through_api(
    base: str, auth: dict[str, str], archive: bytes, name: str, what: str, log: Any, timeout: float
) -> tuple[str, str]:
    """Upload ``archive`` (a zip of class folders) as dataset ``name``, train a resnet18 on it through the API
    (random init, 1 epoch, its default 224 px) and wait: (model id, job id). ``what`` names the model in
    messages."""
    r = httpx.post(
        f"{base}/api/v1/datasets",
        files={"archive": (f"{name}.zip", archive)},
        data={"name": name},
        headers=auth,
        timeout=600,
    )
    r.raise_for_status()
    job = httpx.post(
        f"{base}/api/v1/jobs",
        json={"dataset_id": r.json()["id"], "model": "resnet18", "weights": "none", "epochs": 1},
        headers=auth,
        timeout=30,
    ).json()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = httpx.get(f"{base}/api/v1/jobs/{job['id']}", headers=auth, timeout=10).json()
        if j["status"] in ("succeeded", "failed", "cancelled"):
            if j["status"] != "succeeded":
                raise RuntimeError(f"{what}'s training failed: {j.get('error')}")
            log(f"  trained {what} (resnet18, 224 px) in job {job['id']}")
            return str(j["model_id"]), str(job["id"])
        time.sleep(1)
    raise TimeoutError(f"{what}'s training did not finish")
