"""TorchServe beside us: its own environment, a model archive of the run's weights, the server itself.

TorchServe (PyPI's ``torchserve`` and ``torch-model-archiver``) never enters the product's environment: the
benchmark makes a virtual environment under ``~/.cache/finetune-bench/`` named by a hash of its
requirements, which sees the product environment's packages (torch, torchvision, Pillow) through a ``.pth``
file and adds only TorchServe's own. Java comes from the system (``java`` on the PATH, 17 or newer).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, free_port

REQUIREMENTS = ("torchserve==0.12.0", "torch-model-archiver==0.12.0")
HANDLER = ROOT / "bench" / "torchserve_handler.py"


def env_dir() -> Path:
    key = hashlib.sha256(("\n".join(REQUIREMENTS) + sys.version).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "finetune-bench" / f"torchserve-{key}"


def unavailable() -> str | None:
    """Why TorchServe cannot run here (no Java), or None."""
    if shutil.which("java") is None:
        return "no `java` on the PATH (TorchServe needs a JRE 11+: apt-get install openjdk-17-jre-headless)"
    return None


def ensure_env(log: Any) -> Path:
    """The TorchServe environment (made once; pip reaches PyPI the first time)."""
    venv = env_dir()
    done = venv / ".complete"
    if done.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    log(f"  making TorchServe's environment in {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # Our environment's packages (torch, torchvision, Pillow) are visible; pip installs only what is missing.
    (site / "_finetune_shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *REQUIREMENTS], check=True)
    done.write_text("\n".join(REQUIREMENTS))
    return venv


def make_archive(venv: Path, run_dir: Path, store: Path, name: str) -> Path:
    """``store/name.mar`` with the run's best weights as a plain state dict and its metadata."""
    from safetensors.torch import load_file

    best = (run_dir / "best").resolve()
    work = store / f"{name}-files"
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.save(load_file(str(best / "model.safetensors")), work / "weights.pt")
    shutil.copyfile(best / "meta.json", work / "meta.json")
    subprocess.run(
        [
            str(venv / "bin" / "torch-model-archiver"),
            "--model-name",
            name,
            "--version",
            "1.0",
            "--serialized-file",
            str(work / "weights.pt"),
            "--handler",
            str(HANDLER),
            "--extra-files",
            str(work / "meta.json"),
            "--export-path",
            str(store),
            "--force",
        ],
        check=True,
    )
    return store / f"{name}.mar"


class TorchServe:
    """One TorchServe (Java frontend + one Python worker per registered model), on loopback ports."""

    def __init__(self, venv: Path, store: Path, log_dir: Path) -> None:
        self.venv, self.store, self.log_dir = venv, store, log_dir
        self.port, self.management, self.metrics = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.store / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{self.port}",
                    f"management_address=http://127.0.0.1:{self.management}",
                    f"metrics_address=http://127.0.0.1:{self.metrics}",
                    f"model_store={self.store}",
                    "disable_token_authorization=true",
                    "enable_model_api=true",
                    "install_py_dep_per_model=false",
                    "default_workers_per_model=1",
                    "job_queue_size=1000",
                    "disable_system_metrics=true",
                ]
            )
            + "\n"
        )
        env = {**os.environ, "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("PYTHONPATH", None)  # the worker must not import our code
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env["LOG_LOCATION"] = str(self.log_dir)
        env["METRICS_LOCATION"] = str(self.log_dir)
        with open(self.log_dir / "torchserve.out", "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(self.venv / "bin" / "torchserve"),
                    "--start",
                    "--foreground",
                    "--ncs",
                    "--ts-config",
                    str(config),
                    "--model-store",
                    str(self.store),
                    "--disable-token-auth",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.store,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.proc.returncode}: see {self.log_dir}/torchserve.out")
            try:
                if httpx.get(f"{self.base}/ping", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("TorchServe did not answer /ping within 120 s")

    def register(self, archive: Path, name: str, *, batch_size: int, max_batch_delay_ms: int) -> str:
        """Register ``archive`` as ``name`` with one worker; returns its prediction URL."""
        r = httpx.post(
            f"http://127.0.0.1:{self.management}/models",
            params={
                "url": archive.name,
                "model_name": name,
                "batch_size": batch_size,
                "max_batch_delay": max_batch_delay_ms,
                "initial_workers": 1,
                "synchronous": "true",
            },
            timeout=300,
        )
        if r.status_code >= 300:
            raise RuntimeError(f"TorchServe refused model {name}: {r.status_code} {r.text[:500]}")
        return f"{self.base}/predictions/{name}"

    def describe(self, name: str) -> Any:
        return json.loads(httpx.get(f"http://127.0.0.1:{self.management}/models/{name}", timeout=10).text)

    def stop(self) -> None:
        if self.proc is None:
            return
        subprocess.run(
            [str(self.venv / "bin" / "torchserve"), "--stop", "--foreground"], capture_output=True, timeout=60
        )
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
