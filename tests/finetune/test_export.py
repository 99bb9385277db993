"""Exports (ONNX, TorchScript, int8 ONNX) with their parity check, and the serving runtimes built on them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import cli
from finetune.export import (
    EXPORT_DIR,
    FILE_NAMES,
    MAX_PROB_DIFF,
    ONNX,
    ONNX_INT8,
    TORCHSCRIPT,
    ExportError,
    ParityError,
    export_run,
    parity_summary,
    read_record,
    serving_network,
    verified_export,
)
from finetune.models import ARCHITECTURES
from finetune.predict import Predictor
from finetune.serving import (
    ORT,
    TORCH_CHANNELS_LAST,
    TORCH_EAGER,
    batch_forward,
    candidates,
    cpu_description,
    select_runtime,
)

from .runs import make_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("resnet") / "run", "resnet18")


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("fmt", [ONNX, TORCHSCRIPT])
def test_export_round_trip_for_every_architecture(tmp_path: Path, arch: str, fmt: str) -> None:
    run = make_run(tmp_path / "run", arch, per_split=3)
    result = export_run(run, fmt)

    parity = result.parity
    assert parity["split"] == "test" and parity["images"] == 3
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_prob_diff"] <= MAX_PROB_DIFF
    assert parity["passed"] and result.record["accepted"]
    # The record on disk says the same, for this checkpoint, and the file is the one recorded.
    assert parity_summary(run)[fmt]["parity"] == parity
    assert verified_export(run, fmt).path == result.path == run / EXPORT_DIR / FILE_NAMES[fmt]
    # A second export of the same checkpoint reuses the checked file.
    mtime = result.path.stat().st_mtime_ns
    assert export_run(run, fmt).path.stat().st_mtime_ns == mtime


def test_onnx_export_runs_in_plain_onnxruntime_without_project_code(tmp_path: Path, resnet_run: Path) -> None:
    path = export_run(resnet_run, ONNX).path
    predictor = Predictor.from_run(resnet_run, device="cpu")
    image = next((Path(json.loads((resnet_run / "dataset.json").read_text())["root"])).rglob("*.png"))
    crops = predictor.preprocess(image)[None]
    np.save(tmp_path / "crops.npy", crops)
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np, onnxruntime
        s = onnxruntime.InferenceSession({str(path)!r})
        meta = s.get_modelmeta().custom_metadata_map
        probs = s.run(["probabilities"], {{"image": np.load({str(tmp_path / "crops.npy")!r})}})[0]
        print(json.dumps({{"classes": json.loads(meta["class_names"]), "prep": json.loads(meta["preprocessing"]),
                          "probs": probs.tolist()}}))
        # Nothing of ours was imported on the way (the shared environment could import it).
        assert not [m for m in sys.modules if m.split(".")[0] in ("finetune", "app", "torch")], "project code used"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["classes"] == predictor.classes
    assert got["prep"] == json.loads(json.dumps(predictor.preprocessing.to_dict()))
    expected = predictor.probabilities([crops[0]]).numpy()
    assert np.abs(np.array(got["probs"]) - expected).max() <= MAX_PROB_DIFF


def test_a_corrupted_export_is_refused_and_made_again(resnet_run: Path) -> None:
    path = export_run(resnet_run, ONNX).path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="corrupted"):
        verified_export(resnet_run, ONNX)
    # Asking for it again re-exports from the checkpoint (and checks it again) instead of serving the damage.
    again = export_run(resnet_run, ONNX)
    assert again.parity["passed"] and verified_export(resnet_run, ONNX).path == path


def test_an_export_of_another_checkpoint_is_refused(tmp_path: Path, resnet_run: Path) -> None:
    export_run(resnet_run, ONNX)
    other = make_run(tmp_path / "other", "resnet18", seed=1)
    # The other run's folder gets this run's export and record: its weights are not the ones exported.
    shutil.copytree(resnet_run / EXPORT_DIR, other / EXPORT_DIR)
    with pytest.raises(ExportError, match="another checkpoint"):
        verified_export(other, ONNX)
    # A record forged to name the other checkpoint: the file's own metadata still names the first.
    record = read_record(other)
    record["checkpoint"] = json.loads(json.dumps(read_record(resnet_run)["checkpoint"]))
    record["checkpoint"]["sha256"] = "0" * 64
    (other / EXPORT_DIR / "exports.json").write_text(json.dumps(record))
    with pytest.raises(ExportError):
        verified_export(other, ONNX)
    assert export_run(other, ONNX).parity["passed"]  # and exporting it properly works


def test_an_export_that_disagrees_with_pytorch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resnet_run: Path
) -> None:
    run = make_run(tmp_path / "run", "lenet")

    def drifted(predictor: Predictor) -> torch.nn.Module:
        net = serving_network(predictor)
        with torch.no_grad():
            net.shift += 0.5  # a wrong normalisation constant
        return net

    monkeypatch.setattr("finetune.export.serving_network", drifted)
    with pytest.raises(ParityError, match="refused") as err:
        export_run(run, ONNX)
    assert err.value.parity["max_abs_prob_diff"] > MAX_PROB_DIFF
    assert not (run / EXPORT_DIR / FILE_NAMES[ONNX]).exists()
    assert read_record(run)["formats"][ONNX]["accepted"] is False
    with pytest.raises(ExportError):
        verified_export(run, ONNX)


def test_int8_export_reports_its_accuracy_change(resnet_run: Path) -> None:
    result = export_run(resnet_run, ONNX_INT8)
    p = result.parity
    assert p["thresholds"] is None and p["passed"]
    assert p["accuracy_change_points"] == pytest.approx((p["export_top1"] - p["reference_top1"]) * 100, abs=1e-3)
    assert verified_export(resnet_run, ONNX_INT8).path.name == "model.int8.onnx"


def test_onnx_runtime_and_pytorch_give_the_same_top_k(resnet_run: Path) -> None:
    predictor = Predictor.from_run(resnet_run, device="cpu")
    files = sorted(Path(json.loads((resnet_run / "dataset.json").read_text())["root"]).rglob("*.png"))
    crops = np.stack([predictor.preprocess(f) for f in files])
    options, note = candidates(predictor, resnet_run, "fp32", try_compile=False, use_onnx=True)
    by_name = {r.name: r for r in options}
    assert set(by_name) == {ORT, TORCH_CHANNELS_LAST, TORCH_EAGER} and not note
    reference = torch.from_numpy(by_name[TORCH_CHANNELS_LAST](crops))
    for name in (ORT, TORCH_EAGER):
        probs = torch.from_numpy(by_name[name](crops))
        assert predictor.top_k(probs, 3) == predictor.top_k(reference, 3) or torch.equal(
            probs.topk(3).indices, reference.topk(3).indices
        ), name
        assert torch.equal(probs.topk(3).indices, reference.topk(3).indices), name
        assert (probs - reference).abs().max() <= MAX_PROB_DIFF, name


def test_the_narrow_onnx_session_answers_as_the_wide_one_from_threads_side_by_side(resnet_run: Path) -> None:
    predictor = Predictor.from_run(resnet_run, device="cpu")
    files = sorted(Path(json.loads((resnet_run / "dataset.json").read_text())["root"]).rglob("*.png"))
    crops = [predictor.preprocess(f) for f in files[:6]]
    options, _ = candidates(predictor, resnet_run, "fp32", try_compile=False, use_onnx=True, threads=2, lanes=2)
    by_name = {r.name: r for r in options}
    ort, torch_runtime = by_name[ORT], by_name[TORCH_CHANNELS_LAST]
    assert ort.lanes == 2 and ort.narrow is not None
    assert torch_runtime.narrow is None  # PyTorch passes always run one at a time
    forward = batch_forward(ort, predictor.preprocessing.crop_size, capacity=4)
    wide = forward(crops[:3], False)
    # Two passes at once, on the shared narrow session, each in its own thread's buffer.
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda part: forward(part, True), (crops[:3], crops[3:]))
    assert (first - wide).abs().max() <= MAX_PROB_DIFF
    whole = forward(crops, False)  # more than the buffer holds: still one pass
    assert (torch.cat([first, second]) - whole).abs().max() <= MAX_PROB_DIFF


def test_the_choice_is_recorded_per_device_and_reused(resnet_run: Path) -> None:
    predictor = Predictor.from_run(resnet_run, device="cpu")
    first = select_runtime(predictor, resnet_run, remeasure=True, seconds=0.05)
    serving = json.loads((resnet_run / "serving.json").read_text())
    (device,) = serving["devices"]
    assert device.startswith("cpu:")
    entry = serving["devices"][device]["fp32"]
    assert entry["winner"] == first.runtime.name == max(entry["images_per_sec"], key=entry["images_per_sec"].get)
    again = select_runtime(predictor, resnet_run, seconds=0.05)
    assert again.runtime.name == first.runtime.name and again.measured == entry


def test_the_cpu_is_described_by_its_name_and_vector_features(tmp_path: Path) -> None:
    # What a serving choice is recorded under, and what the benchmarks print beside their figures.
    cpuinfo = tmp_path / "cpuinfo"
    one = "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_int8 amx_tile\n"
    cpuinfo.write_text(f"processor\t: 0\n{one}\nprocessor\t: 1\n{one}")
    assert cpu_description(cpuinfo) == ("Intel(R) Xeon(R) Processor", ["avx2", "avx512f", "avx512_bf16", "amx_int8"])
    name, features = cpu_description(tmp_path / "absent")  # not Linux: the platform's name, nothing claimed
    assert name and features == []


def test_predict_falls_back_to_pytorch_without_onnxruntime(resnet_run: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["onnxruntime"] = None  # as if it were not installed: importing it raises ImportError
        import numpy as np
        from finetune.predict import Predictor
        from finetune.serving import select_runtime
        p = Predictor.from_run({str(resnet_run)!r}, device="cpu")
        choice = select_runtime(p, {str(resnet_run)!r}, seconds=0.05, remeasure=True)
        crops = np.zeros((2, p.preprocessing.crop_size, p.preprocessing.crop_size, 3), np.uint8)
        probs = choice.runtime(crops)
        print(json.dumps({{"runtime": choice.runtime.name, "note": choice.note,
                          "diff": float(abs(probs - p.probabilities(list(crops)).numpy()).max())}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["runtime"].startswith("torch-")
    assert "not installed" in got["note"]
    assert got["diff"] <= 1e-5


def test_cli_export_writes_the_file_and_prints_the_check(
    tmp_path: Path, resnet_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "model.pt"
    assert cli.main(["export", str(resnet_run), "--format", "torchscript", "--out", str(target), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accepted"] and report["parity"]["top1_agreement"] == 1.0
    assert target.read_bytes() == (resnet_run / EXPORT_DIR / FILE_NAMES[TORCHSCRIPT]).read_bytes()
    assert cli.main(["export", str(tmp_path / "nothing-here")]) == cli.EXIT_BAD_INPUT


def test_the_parity_check_finds_the_runs_images_from_any_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service job runs with paths relative to the data folder (its working folder then): an export made
    later, from another working folder, still checks on the run's own test images, not on random crops."""
    from finetune.train import train

    from .helpers import lenet_config, make_shapes_dataset

    make_shapes_dataset(tmp_path / "data" / "images", per_class=8, size=32)
    monkeypatch.chdir(tmp_path / "data")
    train(lenet_config(Path("images"), Path("runs/r"), Path("cache"), epochs=1))
    monkeypatch.chdir(tmp_path)
    result = export_run(tmp_path / "data" / "runs" / "r", "onnx")
    assert result.record["parity"]["split"] == "test" and result.record["parity"]["images"] > 0


def test_an_export_never_touches_the_process_wide_warning_filters(tmp_path: Path) -> None:
    # catch_warnings around each export saved and restored the one filter list of the process: a thread leaving
    # it undid what another thread had set meanwhile (FastAPI silencing a pydantic warning while it built a
    # route), and under pytest's warnings-as-errors a test failed at setup. Exports now leave the list alone.
    import threading
    import time
    import warnings

    run = make_run(tmp_path / "run", "lenet", per_split=3)
    export_run(run, ONNX, force=True)  # the module's own filters are set by now
    before = list(warnings.filters)
    changed = []
    thread = threading.Thread(target=lambda: [export_run(run, fmt, force=True) for fmt in (ONNX, TORCHSCRIPT)])
    thread.start()
    while thread.is_alive():
        if warnings.filters != before:
            changed.append(list(warnings.filters))
        time.sleep(0.0005)
    thread.join()
    assert not changed and warnings.filters == before


def test_exports_of_two_runs_at_once_in_one_process(tmp_path: Path) -> None:
    # The service exports one model in a request thread while another thread exports a second one to
    # serve it; torch's exporters keep process-global state, so they must take turns.
    from concurrent.futures import ThreadPoolExecutor

    runs = [make_run(tmp_path / f"run{i}", "lenet", per_split=3) for i in range(2)]
    jobs = [(run, fmt) for _ in range(3) for run in runs for fmt in (ONNX, TORCHSCRIPT)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: export_run(job[0], job[1], force=True), jobs))
    assert all(result.parity["passed"] for result in results)
    assert {result.path for result in results} == {
        run / EXPORT_DIR / FILE_NAMES[fmt] for run in runs for fmt in (ONNX, TORCHSCRIPT)
    }
