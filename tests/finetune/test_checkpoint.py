"""Checkpoint saving under a kill -9 at any instant: ``last`` and ``best`` always point at whole checkpoints,
a checkpoint they point at is never removed or replaced, epochs only increase, and ``settle`` brings a run
directory back to one consistent state whatever instant the kill fell at."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from finetune.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint, settle
from finetune.errors import CheckpointError

from .helpers import FsKill, Killed

# (epoch, best epoch after it): improvements at 1 and 3, none at 2 and 4
SAVES = [(1, 1), (2, 1), (3, 3), (4, 3)]


def save(run_dir: Path, epoch: int, best_epoch: int, *, commit: bool = True) -> Path:
    meta = {"format_version": FORMAT_VERSION, "epoch": epoch}
    state = {"w": torch.full((4,), float(epoch))}
    return save_checkpoint(
        run_dir, epoch, state, meta, {"epoch": torch.tensor(epoch)}, best_epoch=best_epoch, commit=commit
    )


def linked(run_dir: Path, which: str) -> int | None:
    """The epoch ``which`` points at, checked to be a whole checkpoint of that epoch (None without the link)."""
    if not (run_dir / which).is_symlink():
        return None
    ckpt = load_checkpoint(run_dir, which)
    assert os.readlink(run_dir / which) == os.path.join("checkpoints", f"epoch-{ckpt.epoch:04d}")
    assert torch.equal(ckpt.state_dict()["w"], torch.full((4,), float(ckpt.epoch)))
    assert int(ckpt.train_state()["epoch"]) == ckpt.epoch
    return ckpt.epoch


def folders(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_a_kill_at_any_step_of_the_saves_leaves_whole_links_and_settles(tmp_path: Path) -> None:
    """Four saves (keep_last=1), killed before each file system change they make in turn: the links point at
    whole checkpoints; ``settle`` makes ``best`` what ``last`` says and clears what was never committed; the
    saves then go on from ``last`` and end in the uninterrupted state."""
    (tmp_path / "dry").mkdir()
    with FsKill(tmp_path / "dry") as recorder:
        for epoch, best in SAVES:
            save(tmp_path / "dry", epoch, best)
    assert folders(tmp_path / "dry") == ["epoch-0003", "epoch-0004"]
    for i in range(len(recorder.steps)):
        run_dir = tmp_path / f"kill-{i}"
        run_dir.mkdir()
        with pytest.raises(Killed), FsKill(run_dir, at=i):
            for epoch, best in SAVES:
                save(run_dir, epoch, best)
        last, best_now = linked(run_dir, "last"), linked(run_dir, "best")
        assert best_now is None or (last is not None and best_now <= last), (i, recorder.steps[i])

        settle(run_dir)
        last = linked(run_dir, "last")
        expected_best = dict(SAVES).get(last or 0)
        assert linked(run_dir, "best") == expected_best, (i, recorder.steps[i])
        assert [f for f in folders(run_dir) if not f.startswith("epoch-")] == []
        assert all(int(f[-4:]) <= (last or 0) for f in folders(run_dir))
        for epoch, best in SAVES:
            if epoch > (last or 0):
                save(run_dir, epoch, best)
        assert (linked(run_dir, "last"), linked(run_dir, "best")) == (4, 3)
        assert folders(run_dir) == ["epoch-0003", "epoch-0004"]


def test_epochs_only_increase_and_what_a_link_points_at_is_never_replaced(tmp_path: Path) -> None:
    for epoch, best in SAVES[:2]:
        save(tmp_path, epoch, best)
    for epoch in (1, 2):  # best and last point at these
        with pytest.raises(CheckpointError, match="epochs only increase"):
            save(tmp_path, epoch, epoch)
    assert (linked(tmp_path, "last"), linked(tmp_path, "best")) == (2, 1)

    # What a kill between the two saves of a head stage left with earlier versions: a best, no last. Saving
    # that epoch again would remove what best points at; it is refused, and settle drops the uncommitted best.
    (tmp_path / "last").unlink()
    with pytest.raises(CheckpointError, match="never removed"):
        save(tmp_path, 1, 1)
    assert linked(tmp_path, "best") == 1
    settle(tmp_path)
    assert not (tmp_path / "best").exists() and folders(tmp_path) == []
    save(tmp_path, 1, 1)
    assert (linked(tmp_path, "last"), linked(tmp_path, "best")) == (1, 1)


def test_a_best_is_always_a_checkpoint(tmp_path: Path) -> None:
    save(tmp_path, 1, 1)
    with pytest.raises(CheckpointError, match="best epoch 2 has no checkpoint"):
        save(tmp_path, 3, 2)
    save(tmp_path, 2, 2, commit=False)  # written only: nothing points at it, the retention leaves it
    assert (linked(tmp_path, "last"), linked(tmp_path, "best")) == (1, 1) and folders(tmp_path) == [
        "epoch-0001",
        "epoch-0002",
    ]
    save(tmp_path, 3, 2)
    assert (linked(tmp_path, "last"), linked(tmp_path, "best")) == (3, 2)
    assert folders(tmp_path) == ["epoch-0002", "epoch-0003"]
