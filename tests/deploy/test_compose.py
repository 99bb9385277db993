"""deploy/compose.yaml is a valid Compose file that describes the "Several machines" deployment.

Validated by Compose itself, offline (`config` parses, interpolates and checks the file against the Compose
schema; no engine, no image pulls): the Docker CLI's `docker compose` where its plugin is installed, else
Debian's `docker-compose` (`make compose-deps` installs it; .ci/run runs `make test`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"


def compose_command() -> list[str]:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed: run `make compose-deps`")


def config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose_command(), "-f", str(path), "config"], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    r = config(COMPOSE)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)  # type: ignore[no-any-return]


def test_compose_validates_the_file_offline(resolved: dict[str, Any], tmp_path: Path) -> None:
    assert {"api", "worker", "postgres", "redis", "minio"} <= set(resolved["services"])
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("replicas: 2", "replicas: two"))
    assert config(broken).returncode != 0  # the validator does refuse a wrong file


def test_the_deployment_is_multi_host_and_shares_only_what_it_must(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["FINETUNE_MULTI_HOST"] == "true"
        assert env["FINETUNE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["FINETUNE_QUEUE_BACKEND"] == "redis" and env["FINETUNE_STORAGE_BACKEND"] == "s3"
        assert env["FINETUNE_LOCAL_CACHE_DIR"] == "/cache"
    worker = services["worker"]
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert worker["deploy"]["replicas"] >= 2
    grace = int(str(worker["stop_grace_period"]).rstrip("s"))
    assert grace > int(worker["environment"]["FINETUNE_DRAIN_TIMEOUT_SECONDS"])  # the drain ends before SIGKILL
    assert worker["command"][-1] == "worker" and "--no-worker" in services["api"]["command"]
