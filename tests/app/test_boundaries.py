"""The layers stay apart: the job process and the services never load the web stack (the job process did,
through ``services/datasets`` -> ``uploads`` -> ``fastapi``), and no service takes a request or raises an
HTTP error."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WEB_STACK = ("fastapi", "starlette", "python_multipart", "uvicorn")
SERVICES = sorted(f"app.services.{p.stem}" for p in (REPO / "app" / "services").glob("*.py") if p.stem != "__init__")


def modules_loaded_by(*imports: str) -> list[str]:
    code = "import importlib, json, sys\n"
    code += "".join(f"importlib.import_module({name!r})\n" for name in imports)
    code += "print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("entries", [["app.jobs.child"], ["app.jobs.worker", *SERVICES]], ids=["child", "services"])
def test_the_job_process_and_the_services_do_not_load_the_web_stack(entries: list[str]) -> None:
    loaded = modules_loaded_by(*entries)
    assert [m for m in loaded if m.split(".")[0] in WEB_STACK] == []


def test_services_take_no_request_and_raise_no_api_error() -> None:
    for name in SERVICES:
        path = REPO / Path(*name.split(".")).with_suffix(".py")
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not names & {"Request", "ApiError", "HTTPException"}, name
