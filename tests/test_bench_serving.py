"""``python -m bench serving --quick`` runs end to end (the real service, the naive endpoint, int8 through the
API, the export checks) and writes its tables: the harness the lead runs for the real figures (with
TorchServe, which needs Java and a pip install, left out here) is known to work before anyone waits for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serving_benchmark_quick_mode_writes_its_tables(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "serving", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.quick.json").read_text())["serving"]
    parity = results["parity"]["archs"]["resnet18"]["formats"]
    assert parity["onnx"]["passed"] and parity["onnx"]["top1_agreement"] == 1.0
    assert parity["torchscript"]["passed"] and parity["onnx-int8"]["accuracy_change_points"] is not None
    predict = results["predict"]
    (row_1, row_8) = predict["sizes"]["web"]["rows"]
    for row in (row_1, row_8):
        for arm in ("ours", "ours_int8", "naive"):
            assert row[arm]["requests"] > 0 and row[arm]["errors"] == 0, (arm, row)
    assert predict["served_int8"]["loaded_here"]["runtime"] == "onnxruntime-int8"
    report = (tmp_path / "RESULTS.quick.md").read_text()
    assert "## Serving: our predict endpoint, TorchServe and a naive FastAPI endpoint" in report
    assert "## Exports: parity with PyTorch and the serving runtimes" in report
