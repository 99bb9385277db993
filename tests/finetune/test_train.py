"""Training: each strategy learns, resume is exact, pixels are decoded once, and a crash while saving
never costs the previous checkpoint."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune.pixelcache
from finetune.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from finetune.errors import Cancelled, CheckpointError, ConfigError, DatasetError, WeightsError, WeightsNotCachedError
from finetune.events import BatchEnd, EpochEnd, Event, RunStarted
from finetune.models import build_for_checkpoint, build_model
from finetune.predict import Predictor
from finetune.train import resume, train

from .helpers import CLASSES, StopWhen, Trained, lenet_config, make_shapes_dataset, run_training, shape_image

TIME_KEYS = {"epoch_time", "images_per_sec"}


def weights_of(run_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / which / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"tensors differ: {different}"


def metrics_history(run_dir: Path) -> list[dict[str, Any]]:
    history = json.loads((run_dir / "run.json").read_text())["history"]
    return [{k: v for k, v in h.items() if k not in TIME_KEYS} for h in history]


def fresh_accuracy(run_dir: Path, n_per_class: int = 12) -> float:
    """Top-1 accuracy of the run's best checkpoint on newly generated images it has never seen."""
    rng = random.Random(12345)
    images, labels = [], []
    for name in CLASSES:
        for _ in range(n_per_class):
            images.append(shape_image(name, rng))
            labels.append(name)
    predictions = Predictor.from_run(run_dir, device="cpu").predict(images, top_k=1)
    return sum(p[0].label == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


# -- strategies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["full", "frozen", "two-stage"])
def test_each_strategy_learns_the_shapes(strategy: str, request: pytest.FixtureRequest) -> None:
    trained: Trained = request.getfixturevalue(
        {"full": "full_run", "frozen": "frozen_run"}.get(strategy, "two_stage_run")
    )
    run_dir = trained.run_dir
    evaluation = trained.result.evaluation
    assert evaluation["val"]["count"] == 15 and evaluation["test"]["count"] == 12
    assert evaluation["val"]["top1"] >= 0.9, evaluation["val"]
    assert evaluation["test"]["top1"] >= 0.9, evaluation["test"]
    assert fresh_accuracy(run_dir) >= 0.9

    stages = [h["stage"] for h in trained.result.history]
    expected = {"full": ["finetune"] * 4, "frozen": ["head"] * 4, "two-stage": ["head"] * 3 + ["finetune"] * 4}
    assert stages == expected[strategy]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "succeeded" and info["strategy"] == strategy
    assert (run_dir / "report.json").is_file() and (run_dir / "dataset.json").is_file()
    assert load_checkpoint(run_dir, "best").epoch == trained.result.best_epoch
    assert load_checkpoint(run_dir, "last").epoch == len(stages)


def test_full_training_lowers_the_loss(full_run: Trained) -> None:
    history = full_run.result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.8
    assert history[-1]["train_acc"] > 0.9


def test_frozen_keeps_the_backbone_and_two_stage_changes_it(
    frozen_run: Trained, two_stage_run: Trained, lenet_weights: Path
) -> None:
    start = load_file(str(lenet_weights))
    frozen = weights_of(frozen_run.run_dir, "best")
    two_stage = weights_of(two_stage_run.run_dir, "last")
    backbone = [k for k in start if not k.startswith("fc.")]
    assert backbone and all(torch.equal(frozen[k], start[k]) for k in backbone)
    assert not torch.equal(frozen["fc.weight"], start["fc.weight"])  # a new head was trained
    assert any(not torch.equal(two_stage[k], start[k]) for k in backbone)
    head_epoch = two_stage_run.result.history[2]
    assert head_epoch["stage"] == "head" and head_epoch["val_acc"] >= 0.9  # the head alone already works


def test_events_describe_the_run(full_run: Trained) -> None:
    kinds = [e.kind for e in full_run.events]
    assert kinds[0] == "stage_started" and kinds[-1] == "run_finished"
    assert "run_started" in kinds
    assert kinds.count("epoch_end") == 4
    assert kinds.count("checkpoint_saved") == 4
    batch_ends = [e for e in full_run.events if isinstance(e, BatchEnd)]
    assert len(batch_ends) == 4 * 5  # 45 training images, batches of 8, the last partial one dropped
    assert all(e.eta is not None and e.eta >= 0 for e in batch_ends)
    json.dumps([e.to_dict() for e in full_run.events])


def test_retention_keeps_best_and_last_only(full_run: Trained) -> None:
    names = {p.name for p in (full_run.run_dir / "checkpoints").iterdir()}
    linked = {(full_run.run_dir / w).resolve().name for w in ("best", "last")}
    assert names == linked


def test_googlenet_trains_with_auxiliary_heads(shapes_data: Path, tmp_path: Path, session_cache: Path) -> None:
    config = lenet_config(
        shapes_data, tmp_path / "run", session_cache, model="googlenet", image_size=32, epochs=1, batch_size=16
    )
    trained = run_training(config)
    torch.manual_seed(config.seed)  # as the trainer does: the initial weights depend only on the seed
    initial = build_model("googlenet", 3, "none", image_size=32).model.state_dict()
    final = weights_of(trained.run_dir)
    # Auxiliary heads only get gradients from the auxiliary losses: they moved (a little: one epoch from
    # these very weights), so those losses were used.
    for name in ("aux1.fc1.weight", "aux2.fc2.weight", "fc.weight", "conv1.conv.weight"):
        change = (final[name] - initial[name]).abs().max() / initial[name].abs().max()
        assert 0 < change < 0.5, (name, change)
    predictor = Predictor.from_run(trained.run_dir, device="cpu")
    assert predictor.meta["transform_input"] is False
    (preds,) = predictor.predict([shape_image("circle", random.Random(0))], top_k=3)
    assert sorted(p.label for p in preds) == sorted(CLASSES)


def test_train_refuses_a_used_run_dir_and_bad_data(tmp_path: Path, shapes_data: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        train(lenet_config(shapes_data, out, tmp_path / "cache"))
    with pytest.raises(DatasetError, match="dataset not found"):
        train(lenet_config(tmp_path / "nope", tmp_path / "run2", tmp_path / "cache"))


# -- resume ------------------------------------------------------------------------------------------------


def test_resume_after_cancel_matches_an_uninterrupted_run(full_run: Trained, tmp_path: Path) -> None:
    out = tmp_path / "run"
    stop = StopWhen(lambda e: isinstance(e, BatchEnd) and (e.epoch, e.batch) == (2, 3))
    with pytest.raises(Cancelled):
        train(replace(full_run.config, out=str(out)), [stop], stop.should_stop)
    assert json.loads((out / "run.json").read_text())["status"] == "cancelled"
    assert load_checkpoint(out, "last").epoch == 1
    assert os.readlink(out / "last") == os.path.join("checkpoints", "epoch-0001")

    events: list[Event] = []
    result = resume(out, [events.append])
    assert [e.resumed_from_epoch for e in events if isinstance(e, RunStarted)] == [1]
    assert [e.epoch for e in events if isinstance(e, EpochEnd)] == [2, 3, 4]
    assert_same_weights(weights_of(out, "last"), weights_of(full_run.run_dir, "last"))
    assert_same_weights(weights_of(out, "best"), weights_of(full_run.run_dir, "best"))
    assert metrics_history(out) == metrics_history(full_run.run_dir)
    assert result.evaluation == full_run.result.evaluation


@pytest.mark.parametrize("where", ["head", "finetune"])
def test_two_stage_resume_matches_an_uninterrupted_run(where: str, two_stage_run: Trained, tmp_path: Path) -> None:
    out = tmp_path / "run"
    if where == "head":  # before any checkpoint exists: resume starts over
        stop = StopWhen(lambda e: isinstance(e, EpochEnd) and e.epoch == 2)
    else:
        stop = StopWhen(lambda e: isinstance(e, BatchEnd) and (e.epoch, e.batch) == (5, 2))
    with pytest.raises(Cancelled):
        train(replace(two_stage_run.config, out=str(out)), [stop], stop.should_stop)
    assert (out / "last").exists() == (where == "finetune")
    resume(out)
    assert_same_weights(weights_of(out, "last"), weights_of(two_stage_run.run_dir, "last"))
    assert metrics_history(out) == metrics_history(two_stage_run.run_dir)


def test_resume_refuses_a_changed_dataset(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "data", per_class=8, size=32)
    out = tmp_path / "run"
    stop = StopWhen(lambda e: isinstance(e, EpochEnd) and e.epoch == 1)
    with pytest.raises(Cancelled):
        train(lenet_config(data, out, tmp_path / "cache", epochs=2), [stop], stop.should_stop)
    shape_image("circle", random.Random(99), 32).save(data / "circle" / "new.png")
    with pytest.raises(CheckpointError, match="dataset changed"):
        resume(out)


# -- decode once -------------------------------------------------------------------------------------------


def test_images_are_decoded_once_across_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_shapes_dataset(tmp_path / "data", per_class=6, size=32, classes=["circle", "square"])
    decoded: list[int] = []
    lock = threading.Lock()
    real = finetune.pixelcache.decode_for_size

    def spy(source: Any, short_side: int, **kw: Any) -> Any:
        with lock:
            decoded.append(short_side)
        return real(source, short_side, **kw)

    monkeypatch.setattr(finetune.pixelcache, "decode_for_size", spy)
    cache = tmp_path / "cache"
    config = lenet_config(data, tmp_path / "a", cache, epochs=1, val_fraction=0.2, test_fraction=0.0)
    train(config)
    assert decoded == [37] * 12  # every file once, at LeNet's resize size
    decoded.clear()
    train(lenet_config(data, tmp_path / "b", cache, epochs=2, val_fraction=0.2, test_fraction=0.0, seed=5))
    assert decoded == []  # another run, another seed and split: nothing decoded again
    train(lenet_config(data, tmp_path / "c", cache, epochs=1, image_size=48, val_fraction=0.2, test_fraction=0.0))
    assert decoded == [56] * 12  # a new size is a new cache entry


# -- crash while saving ------------------------------------------------------------------------------------


def test_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_shapes_dataset(tmp_path / "data", per_class=8, size=32)
    cache = tmp_path / "cache"
    real_save = torch.save

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if "epoch-0002" in str(getattr(f, "name", f)):  # epoch 2's training state: half of it, then the disk "fails"
            f.write(b"PK\x03\x04 half written")
            raise OSError(28, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train(lenet_config(data, out, cache, epochs=3))
    monkeypatch.undo()

    last = load_checkpoint(out, "last")
    assert last.epoch == 1
    assert os.readlink(out / "last") == os.path.join("checkpoints", "epoch-0001")
    model = build_for_checkpoint("lenet", 3, False)
    model.load_state_dict(last.state_dict())
    assert last.train_state()["stage"] == "finetune"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]  # no temp folder left
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "No space left" in info["error"]

    # The run goes on from epoch 1 and ends exactly where an uninterrupted one does.
    resume(out)
    clean = tmp_path / "clean"
    train(lenet_config(data, clean, cache, epochs=3))
    assert_same_weights(weights_of(out), weights_of(clean))


def test_failing_safetensors_write_leaves_last_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    state = {"w": torch.arange(4.0)}
    meta = {"format_version": FORMAT_VERSION, "epoch": 1}
    save_checkpoint(tmp_path, 1, state, {**meta, "epoch": 1}, None, best_epoch=1)

    def torn(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")  # a torn header
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safetensors.torch, "save_file", torn)
    with pytest.raises(OSError, match="Input/output error"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(4)}, {**meta, "epoch": 2}, None, best_epoch=2)
    for which in ("last", "best"):
        ckpt = load_checkpoint(tmp_path, which)
        assert ckpt.epoch == 1 and torch.equal(ckpt.state_dict()["w"], state["w"])
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch-0001"]


def test_load_checkpoint_errors(tmp_path: Path, full_run: Trained) -> None:
    with pytest.raises(CheckpointError, match="run directory not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no 'best' checkpoint"):
        load_checkpoint(tmp_path / "empty")
    # A checkpoint folder can be given directly, and "best" falls back to "last" when there is no best.
    direct = load_checkpoint(full_run.run_dir / "last")
    assert direct.epoch == 4
    copy = tmp_path / "copy"
    shutil.copytree(full_run.run_dir, copy, symlinks=True)
    (copy / "best").unlink()
    assert load_checkpoint(copy, "best").epoch == 4
    meta = json.loads((copy / "last" / "meta.json").read_text())
    (copy / "last" / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(copy, "last")


def test_a_run_that_cannot_start_leaves_its_folder_reusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_shapes_dataset(tmp_path / "data", per_class=6, size=32)
    cache, out = tmp_path / "cache", tmp_path / "run"
    decoded: list[int] = []
    real = finetune.pixelcache.decode_for_size

    def spy(*args: Any, **kwargs: Any) -> Any:
        decoded.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune.pixelcache, "decode_for_size", spy)

    # Missing weights are refused before a single image is decoded.
    with pytest.raises(WeightsNotCachedError, match="finetune weights import resnet18"):
        train(lenet_config(data, out, cache, model="resnet18", weights="imagenet", weights_dir=str(tmp_path / "w")))
    with pytest.raises(WeightsError, match="weights file not found"):
        train(lenet_config(data, out, cache, weights=str(tmp_path / "missing.safetensors")))
    assert decoded == []

    # Weights that do not fit are found once the dataset is read; the folder is still left empty.
    wrong = tmp_path / "wrong.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(WeightsError, match="weights do not fit lenet"):
        train(lenet_config(data, out, cache, weights=str(wrong)))
    assert list(out.iterdir()) == []
    # So the same command, with the weights fixed, just works.
    assert train(lenet_config(data, out, cache, epochs=1)).run_dir == out
