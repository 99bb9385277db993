"""The ``finetune`` command line, called in-process (and once as a process to check it starts light)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import EXIT_BAD_INPUT, EXIT_OK, main
from finetune.errors import Cancelled
from finetune.events import EpochEnd
from finetune.train import train

from .helpers import CLASSES, StopWhen, distinct_pngs, lenet_config, make_shapes_dataset, shape_image

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, finetune.cli; finetune.cli.build_parser(); assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    help_run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "finetune", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_run.returncode == 0
    assert "train" in help_run.stdout and "predict" in help_run.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in help_run.stderr.splitlines() if "|" in line]
    assert "finetune.cli" in imported
    assert not [m for m in imported if m == "torch" or m.startswith(("torch.", "torchvision", "numpy"))]


def test_inspect_json_prints_the_report(capsys: pytest.CaptureFixture[str], shapes_data: Path) -> None:
    code, out, _ = run_cli(capsys, "inspect", str(shapes_data), "--json", "--seed", "3")
    assert code == EXIT_OK
    report = json.loads(out)
    assert report["classes"] == sorted(CLASSES)
    assert report["num_images"] == 72 and report["split"] == "stratified"
    assert len(report["files"]) == 72


def test_inspect_text_lists_classes_skips_and_warnings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pngs = distinct_pngs(5)
    for i, d in enumerate(pngs):
        (tmp_path / "d" / ("red" if i < 3 else "blue")).mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / ("red" if i < 3 else "blue") / f"{i}.png").write_bytes(d)
    (tmp_path / "d" / "red" / "bad.png").write_bytes(b"nope")
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "d"), "--files")
    assert code == EXIT_OK
    assert "2 classes, 5 usable images (stratified split)" in out
    assert "skipped red/bad.png: not an image" in out
    assert "warning [small_class]" in out
    assert "red/0.png" in out


def test_inspect_a_zip_extracts_into_the_cache_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import zipfile

    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, d in enumerate(distinct_pngs(6)):
            zf.writestr(f"{'ab'[i % 2]}/{i}.png", d)
    code, out, _ = run_cli(capsys, "inspect", str(archive), "--json", "--cache-dir", str(tmp_path / "cache"))
    assert code == EXIT_OK and json.loads(out)["classes"] == ["a", "b"]
    assert (tmp_path / "cache" / "extracted").is_dir()


def test_bad_input_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, shapes_data: Path) -> None:
    one_class = tmp_path / "one"
    (one_class / "red").mkdir(parents=True)
    for i, d in enumerate(distinct_pngs(3)):
        (one_class / "red" / f"{i}.png").write_bytes(d)
    cache = ["--cache-dir", str(tmp_path / "cache")]

    code, _, err = run_cli(capsys, "inspect", str(one_class), *cache)
    assert code == EXIT_BAD_INPUT and "at least 2 classes" in err
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "missing"), *cache)
    assert code == EXIT_BAD_INPUT and "dataset not found" in err

    common = ["--model", "lenet", "--weights", "none", *cache]
    code, _, err = run_cli(capsys, "train", str(one_class), "--out", str(tmp_path / "r1"), *common)
    assert code == EXIT_BAD_INPUT and "at least 2 classes" in err
    code, _, err = run_cli(capsys, "train", str(shapes_data), "--out", str(tmp_path / "r2"), *common, "--lr", "-1")
    assert code == EXIT_BAD_INPUT and "lr must be between" in err
    assert not (tmp_path / "r2").exists()  # refused before anything was created
    code, _, err = run_cli(
        capsys, "train", str(shapes_data), "--out", str(tmp_path / "r3"), *common, "--epochs", "0", "--batch-size", "0"
    )
    assert code == EXIT_BAD_INPUT and "epochs must be" in err and "batch_size must be" in err
    code, _, err = run_cli(capsys, "train", "--model", "lenet")
    assert code == EXIT_BAD_INPUT and "train needs DATA and --out" in err
    weights_dir = ["--weights-dir", str(tmp_path / "weights")]  # empty: never the user's torch cache
    code, _, err = run_cli(
        capsys, "train", str(shapes_data), "--out", str(tmp_path / "r5"), "--model", "resnet18", *cache, *weights_dir
    )
    assert code == EXIT_BAD_INPUT and "finetune weights fetch resnet18" in err  # no cached ImageNet weights
    assert not (tmp_path / "r5").exists()


def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv in (
        ["train", "data", "--out", "run", "--model", "vgg16"],
        ["train", "data", "--out", "run", "--epochs", "many"],
        ["predict"],
        ["frobnicate"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    assert "invalid choice: 'vgg16'" in capsys.readouterr().err


def test_train_predict_and_eval(capsys: pytest.CaptureFixture[str], tmp_path: Path, shapes_data: Path) -> None:
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(
        capsys,
        "train",
        str(shapes_data),
        "--out",
        str(run_dir),
        "--model",
        "lenet",
        "--weights",
        "none",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "0.003",
        "--val-fraction",
        "0.2",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--json",
    )
    assert code == EXIT_OK
    lines = [json.loads(line) for line in out.splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds.count("epoch_end") == 3 and "batch_end" not in kinds
    result = lines[-1]
    assert result["kind"] == "result" and result["run_dir"] == str(run_dir)
    assert result["evaluation"]["val"]["top1"] >= 0.9

    rng = random.Random(4)
    images = []
    for name in CLASSES:
        path = tmp_path / f"{name}.png"
        shape_image(name, rng).save(path)
        images.append(path)
    code, out, _ = run_cli(capsys, "predict", str(run_dir), *map(str, images), "--top-k", "2", "--device", "cpu")
    assert code == EXIT_OK
    assert f"{images[0]}:" in out and "%" in out
    code, out, _ = run_cli(
        capsys, "predict", str(run_dir), *map(str, images), "--top-k", "2", "--json", "--device", "cpu"
    )
    assert code == EXIT_OK
    answers = json.loads(out)
    assert [a["image"] for a in answers] == list(map(str, images))
    assert all(len(a["predictions"]) == 2 for a in answers)
    assert [a["predictions"][0]["label"] for a in answers] == list(CLASSES)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    code, out, _ = run_cli(capsys, "predict", str(run_dir), str(images[0]), str(bad), "--json", "--device", "cpu")
    assert code == EXIT_BAD_INPUT
    assert "error" in json.loads(out)[1] and "predictions" in json.loads(out)[0]
    code, _, err = run_cli(capsys, "predict", str(tmp_path / "no-run"), str(images[0]))
    assert code == EXIT_BAD_INPUT and "run directory not found" in err

    cache = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    code, out, _ = run_cli(capsys, "eval", str(run_dir), str(shapes_data), *cache)
    assert code == EXIT_OK
    assert "test: 72 images" in out and "precision" in out and "circle" in out
    code, out, _ = run_cli(capsys, "eval", str(run_dir), str(shapes_data), "--json", "--checkpoint", "last", *cache)
    assert code == EXIT_OK
    report = json.loads(out)
    assert report["metrics"]["count"] == 72 and report["checkpoint"] == "last"


def test_train_resume_via_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "data", per_class=8, size=32)
    out = tmp_path / "run"
    stop = StopWhen(lambda e: isinstance(e, EpochEnd) and e.epoch == 1)
    with pytest.raises(Cancelled):
        train(lenet_config(data, out, tmp_path / "cache", epochs=3), [stop], stop.should_stop)
    code, stdout, _ = run_cli(capsys, "train", "--resume", str(out), "--json")
    assert code == EXIT_OK
    events = [json.loads(line) for line in stdout.splitlines()]
    assert next(e for e in events if e["kind"] == "run_started")["resumed_from_epoch"] == 1
    assert [e["epoch"] for e in events if e["kind"] == "epoch_end"] == [2, 3]
    assert events[-1]["kind"] == "result"
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "nothing"))
    assert code == EXIT_BAD_INPUT and "not found" in err


def test_weights_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    code, out, _ = run_cli(capsys, "weights", "list", "--dir", str(folder), "--json")
    assert code == EXIT_OK
    rows = json.loads(out)
    assert [r["arch"] for r in rows] == [
        "alexnet",
        "googlenet",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
    ]
    assert all(r["present"] is False and r["path"].startswith(str(folder)) for r in rows)
    code, out, _ = run_cli(capsys, "weights", "list", "--dir", str(folder))
    assert code == EXIT_OK and f"weights folder: {folder}" in out and "missing" in out

    fake = tmp_path / "resnet18.pth"
    fake.write_bytes(b"not weights")
    code, _, err = run_cli(capsys, "weights", "import", "resnet18", str(fake), "--dir", str(folder))
    assert code == EXIT_BAD_INPUT and "does not match torchvision's published hash" in err
    code, _, err = run_cli(capsys, "weights", "fetch", "resnet18", "--dir", str(folder), "--url", fake.as_uri())
    assert code == EXIT_BAD_INPUT and "failed its hash check" in err
    assert list(folder.iterdir()) == []


def test_class_folders_that_clean_up_to_one_name_exit_2_naming_both(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The service refuses these folders (it stores names cleaned); the CLI refuses them the same way."""
    pngs = iter(distinct_pngs(6))
    for folder in ("cat", "ca\u200dt", "dog"):
        (tmp_path / "d" / folder).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "d" / folder / f"{i}.png").write_bytes(next(pngs))
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "d"), "--cache-dir", str(tmp_path / "cache"))
    assert code == EXIT_BAD_INPUT and "'cat'" in err and "'ca\\u200dt'" in err and "would become one" in err
