"""A run's life across crashes and resumes: a finished stage (also one ended by early stopping) is never
trained again, epoch numbers only increase, the patience count survives a resume, and a kill -9 at any
step of the file system work leaves ``best`` and ``last`` pointing at whole checkpoints, from which the run
ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoint import load_checkpoint
from finetune.errors import Cancelled
from finetune.events import BatchEnd, EarlyStopped, EpochEnd, Event, RunStarted
from finetune.train import resume, train

from .helpers import FsKill, Killed, StopWhen, Trained, lenet_config, run_training

TIME_KEYS = {"epoch_time", "images_per_sec"}


@pytest.fixture(scope="module")
def two_stage_early(shapes_data: Path, session_cache: Path, runs_dir: Path, lenet_weights: Path) -> Trained:
    """Two-stage with early stopping: the head stage stops at epoch 3 (best: 1) of its 8, the fine-tune stage
    (epochs 9-14) at epoch 10."""
    config = lenet_config(
        shapes_data,
        runs_dir / "two-stage-early",
        session_cache,
        weights=str(lenet_weights),
        strategy="two-stage",
        lr=1e-2,
        head_epochs=8,
        epochs=6,
        early_stopping=2,
    )
    return run_training(config)


@pytest.fixture(scope="module")
def full_early(shapes_data: Path, session_cache: Path, runs_dir: Path) -> Trained:
    """All layers from random weights with early stopping: stops at epoch 4 of 10 (best: 2)."""
    return run_training(lenet_config(shapes_data, runs_dir / "full-early", session_cache, epochs=10, early_stopping=2))


@pytest.fixture(scope="module")
def frozen_early(shapes_data: Path, session_cache: Path, runs_dir: Path, lenet_weights: Path) -> Trained:
    """The head alone with early stopping: stops at epoch 3 of 8 (best: 1), so best and last differ."""
    config = lenet_config(
        shapes_data,
        runs_dir / "frozen-early",
        session_cache,
        weights=str(lenet_weights),
        strategy="frozen",
        lr=1e-2,
        epochs=8,
        early_stopping=2,
    )
    return run_training(config)


def stop_at_batch(epoch: int, batch: int) -> StopWhen:
    """A cancel pressed during ``batch`` of ``epoch`` (the run stops at the next batch: that epoch never ends)."""
    return StopWhen(lambda e: isinstance(e, BatchEnd) and (e.epoch, e.batch) == (epoch, batch))


def epochs_of(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.stage, e.epoch) for e in events if isinstance(e, EpochEnd)]


def history(run_dir: Path) -> list[dict[str, Any]]:
    entries = json.loads((run_dir / "run.json").read_text())["history"]
    return [{k: v for k, v in h.items() if k not in TIME_KEYS} for h in entries]


def weights(run_dir: Path, which: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / which / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def assert_ends_like(out: Path, reference: Trained) -> None:
    """The run in ``out`` ended with the reference run's history, best weights and evaluation."""
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "succeeded"
    assert history(out) == history(reference.run_dir)
    assert_same_weights(weights(out, "best"), weights(reference.run_dir, "best"))
    assert_same_weights(weights(out, "last"), weights(reference.run_dir, "last"))
    assert info["evaluation"] == reference.result.evaluation


def assert_links_whole(run_dir: Path) -> None:
    """``best`` and ``last``, where they exist, point at whole checkpoints named for their epoch; a ``best``
    never exists without a ``last`` (``last`` is the commit point)."""
    for which in ("last", "best"):
        link = run_dir / which
        if not link.is_symlink():
            continue
        ckpt = load_checkpoint(run_dir, which)
        assert ckpt.path.name == f"epoch-{ckpt.epoch:04d}", (which, os.readlink(link))
        assert ckpt.state_dict()
        if which == "last":
            assert ckpt.train_state()["rng"]["torch"].numel() > 0
    if (run_dir / "best").is_symlink():
        assert (run_dir / "last").is_symlink()


# -- early stopping, then a crash ------------------------------------------------------------------------------


def test_two_stage_early_stopped_in_its_head_stage_resumes_in_its_finetune_stage(
    two_stage_early: Trained, tmp_path: Path
) -> None:
    """The head stage stops early at epoch 3; the run is killed during the first fine-tune epoch (9). The
    resumed run goes on with epoch 9: the head stage is never trained again, no epoch number comes twice."""
    assert epochs_of(two_stage_early.events) == [
        ("head", 1),
        ("head", 2),
        ("head", 3),
        ("finetune", 9),
        ("finetune", 10),
    ]
    out = tmp_path / "run"
    stop = stop_at_batch(9, 1)
    with pytest.raises(Cancelled):
        train(replace(two_stage_early.config, out=str(out)), [stop], stop.should_stop)
    assert load_checkpoint(out, "best").epoch == 1
    assert [h["epoch"] for h in load_checkpoint(out, "last").meta["history"]] == [1, 2, 3]

    events: list[Event] = []
    resume(out, [events.append])
    assert [e.resumed_from_epoch for e in events if isinstance(e, RunStarted)] == [3]
    assert epochs_of(events) == [("finetune", 9), ("finetune", 10)]
    assert [e.epoch for e in events if isinstance(e, EarlyStopped)] == [10]
    assert_ends_like(out, two_stage_early)
    assert_links_whole(out)


def test_a_checkpoint_written_before_resume_points_were_recorded_resumes_the_same(
    two_stage_early: Trained, full_early: Trained, tmp_path: Path
) -> None:
    """Checkpoints of earlier versions have no ``resume`` record: where to go on is worked out as it was
    recorded (a head checkpoint ends its stage; a fine-tune one ends it at its last epoch or stopping early)."""
    for done, stop_at in ((two_stage_early, (9, 1)), (full_early, (4, 2))):
        out = tmp_path / done.run_dir.name
        stop = stop_at_batch(*stop_at)
        with pytest.raises(Cancelled):
            train(replace(done.config, out=str(out)), [stop], stop.should_stop)
        meta_file = out / "last" / "meta.json"
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("resume", "best_checkpoint")}))

        events: list[Event] = []
        resume(out, [events.append])
        assert epochs_of(events)[0] == ("finetune", stop_at[0])
        assert_ends_like(out, done)


@pytest.mark.parametrize(
    ("reference", "stopped_at"), [("full_early", 4), ("two_stage_early", 10), ("frozen_early", 3)], ids=str
)
def test_a_run_killed_after_early_stopping_is_not_trained_again(
    reference: str, stopped_at: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Killed once its last stage has stopped early (before the final evaluation): the resumed run trains
    nothing more, it only evaluates, and ends as the uninterrupted run did."""
    done: Trained = request.getfixturevalue(reference)
    out = tmp_path / "run"

    def kill_at_the_last_early_stop(event: Event) -> None:
        if isinstance(event, EarlyStopped) and event.epoch == stopped_at:
            raise Killed

    with pytest.raises(Killed):
        train(replace(done.config, out=str(out)), [kill_at_the_last_early_stop])
    assert load_checkpoint(out, "last").epoch == stopped_at

    events: list[Event] = []
    resume(out, [events.append])
    assert epochs_of(events) == []
    assert not any(isinstance(e, BatchEnd) for e in events)
    assert_ends_like(out, done)
    assert_links_whole(out)


def test_a_resumed_run_keeps_counting_epochs_without_improvement(full_early: Trained, tmp_path: Path) -> None:
    """Cancelled during epoch 4, after epoch 3 did not improve: the resumed run still stops early at 4, as the
    uninterrupted run does (the patience count is part of the checkpoint, not restarted by a resume)."""
    out = tmp_path / "run"
    stop = stop_at_batch(4, 2)
    with pytest.raises(Cancelled):
        train(replace(full_early.config, out=str(out)), [stop], stop.should_stop)
    assert load_checkpoint(out, "last").epoch == 3

    events: list[Event] = []
    resume(out, [events.append])
    assert epochs_of(events) == [("finetune", 4)]
    assert_ends_like(out, full_early)


# -- a kill -9 between any two file system steps ---------------------------------------------------------------


def checkpoint_steps(config: Any, out: Path) -> list[int]:
    """The numbers of the changes the uninterrupted run makes to its checkpoints and links (removals inside
    a folder already renamed to be thrown away left out: a kill in any of them leaves the same state)."""
    with FsKill(out) as recorder:
        train(replace(config, out=str(out)))
    return [
        i
        for i, step in enumerate(recorder.steps)
        if any(part in step for part in ("/checkpoints", "/last", "/best", "/.last.", "/.best."))
        and not (step.startswith(("unlink", "rmdir")) and "/.trash-" in step)
    ]


@pytest.mark.parametrize("reference", ["two_stage_early", "frozen_early"])
def test_a_kill_at_any_file_system_step_leaves_whole_checkpoints_and_resumes_exactly(
    reference: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The run is killed (kill -9: nothing runs after it, no cleanup either) before each change it makes to its
    checkpoints in turn: new folders, renames, links, removals. After every one, ``best`` and ``last`` are
    whole checkpoints (or absent), and the resumed run ends exactly like the uninterrupted one."""
    done: Trained = request.getfixturevalue(reference)
    steps = checkpoint_steps(done.config, tmp_path / "dry")
    assert len(steps) >= 8, steps  # the head stage's two checkpoints at least: folders, renames, links
    for i in [*steps, steps[-1] + 1]:
        out = tmp_path / f"kill-{i}"
        with pytest.raises(Killed), FsKill(out, at=i):
            train(replace(done.config, out=str(out)))
        assert_links_whole(out)
        resume(out)
        assert_links_whole(out)
        assert_ends_like(out, done)
