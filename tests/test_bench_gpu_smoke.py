"""bench/gpu.sh must run from a plain checkout on a CUDA machine that has torch, torchvision, numpy and
Pillow and nothing else of ours. No GPU here: this runs the same script on the CPU (tiny sizes) in a Python
that sees only those packages and what they require, so a GPU session spends its device time measuring,
not debugging."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bench.gpu import ALLOWED_DISTRIBUTIONS

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def bare_site_packages(into: Path) -> Path:
    """A folder of links to torch, torchvision, numpy, Pillow and their requirements (recursively), with
    their metadata: a site-packages as pip would leave it on a bare CUDA machine."""
    wanted: set[str] = set()
    todo = [_norm(d) for d in ALLOWED_DISTRIBUTIONS]
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_norm(re.split(r"[][ ;<>=!~(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    site = Path(sysconfig.get_paths()["purelib"])
    into.mkdir()
    for dist in md.distributions():
        if _norm(dist.metadata["Name"]) not in wanted:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (site / top).exists() and not (into / top).exists() and not top.endswith(".pth"):
                (into / top).symlink_to(site / top)
    return into


@pytest.mark.slow
def test_gpu_benchmark_runs_with_only_torch_torchvision_numpy_pillow(tmp_path: Path) -> None:
    site = bare_site_packages(tmp_path / "site")
    assert not (site / "fastapi").exists() and not (site / "safetensors").exists() and (site / "torch").exists()
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--archs", "resnet18", "--images", "24", "--batch", "4", "--seconds", "0.2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"
    proc = subprocess.run(
        # -S: no site-packages of this environment, only the folder above and the checkout.
        [sys.executable, "-S", "-m", "bench.gpu", *args, "--no-compile", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["archs"]["resnet18"]
    assert row["forward_gflops"] > 1.0  # torchvision's published count for resnet18 (1.81)
    for arm in ("ours", "tutorial", "predict"):
        assert row[arm]["images_per_sec"] > 0
    assert row["ratio"] == row["ours"]["images_per_sec"] / row["tutorial"]["images_per_sec"]
    # The serving half: the uint8-in forward pass measured; ONNX Runtime is not on a bare machine, and says so.
    serving = row["serving"]
    assert serving["torch"]["fp32"]["4"] > 0
    assert "not installed" in serving["onnxruntime"]["skipped"]


def test_multi_gpu_section_is_skipped_with_a_reason_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from bench import ddp

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the section runs")
    assert ddp.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert "--nproc-per-node" in (ROOT / "bench" / "gpu.sh").read_text()


def test_multi_gpu_summary_is_images_per_second_and_scaling_efficiency() -> None:
    from bench.ddp import summary

    rows = [{"ranks": 2, "images_per_sec": 1800.0}, {"ranks": 1, "images_per_sec": 1000.0}]
    assert summary(rows) == [
        {"ranks": 1, "images_per_sec": 1000.0, "scaling_efficiency": 1.0},
        {"ranks": 2, "images_per_sec": 1800.0, "scaling_efficiency": 0.9},
    ]
