"""A disk that fills up during a save, on a real (small, tmpfs) filesystem: the engine raises it as the
OSError ENOSPC it is, whichever library was writing, keeps the previous checkpoint loadable and leaves no
half-written folder; once there is space again, the run resumes to the end."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from finetune.checkpoint import load_checkpoint
from finetune.events import CheckpointSaved, Event
from finetune.predict import Predictor
from finetune.train import resume, train
from tests.smallfs import fill, free_space, small_filesystem

from .helpers import lenet_config, make_shapes_dataset

PAGE = 4096


def pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE) * PAGE


def chain(e: BaseException | None) -> list[BaseException]:
    found = []
    while e is not None and e not in found:
        found.append(e)
        e = e.__cause__ or e.__context__
    return found


@pytest.mark.parametrize(
    ("room", "writer"),
    [("pages", "SafetensorError"), ("weights", "RuntimeError")],
    ids=["full-during-the-weights", "full-during-the-training-state"],
)
def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path: Path, room: str, writer: str) -> None:
    data = make_shapes_dataset(tmp_path / "data", per_class=8, size=32)
    cache = tmp_path / "cache"
    with small_filesystem(tmp_path / "disk", "8m") as disk:
        out = disk / "run"

        def fill_after_epoch_1(event: Event) -> None:
            if isinstance(event, CheckpointSaved) and event.epoch == 1:
                ckpt = Path(event.path)
                # Some room, as a real disk has when it fills up: epoch 2's weights (safetensors) or its
                # training state (torch.save) is the write that fails, and once the half-written folder is
                # removed run.json's "failed" fits, so the engine's own error is what propagates.
                fill(disk, 16 * PAGE if room == "pages" else pages(ckpt / "model.safetensors") + 2 * PAGE)

        with pytest.raises(OSError) as raised:
            train(lenet_config(data, out, cache, epochs=3), [fill_after_epoch_1])
        assert raised.value.errno == errno.ENOSPC, chain(raised.value)
        assert writer in [type(e).__name__ for e in chain(raised.value)]  # that library's error, underneath

        for which in ("last", "best"):
            assert os.readlink(out / which) == os.path.join("checkpoints", "epoch-0001")
            ckpt = load_checkpoint(out, which)
            assert ckpt.epoch == 1 and ckpt.state_dict() and ckpt.train_state()["stage"] == "finetune"
        assert Predictor.from_run(out, device="cpu").classes == ["circle", "square", "triangle"]
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001"]  # nothing half-written

        free_space(disk)
        result = resume(out)
        assert [h["epoch"] for h in result.history] == [1, 2, 3]
        assert load_checkpoint(out, "last").epoch == 3
