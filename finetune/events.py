"""Progress events: what the trainer tells its caller (the CLI prints them, a job process stores them).

Every event is a small dataclass with a ``kind`` and ``to_dict()``; callbacks are plain callables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Event:
    kind: str = field(init=False, default="event")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunStarted(Event):
    run_dir: str
    arch: str
    strategy: str
    num_classes: int
    train_images: int
    val_images: int
    test_images: int
    total_epochs: int
    device: str
    resumed_from_epoch: int = 0
    # "source": recorded (a list given to the run), folders (train/val/test) or drawn (seed and fractions);
    # the counts per class and split.
    split: dict[str, Any] | None = None
    devices: int = 1  # data-parallel processes (ranks)
    global_batch: int | None = None  # images per optimizer step across them
    kind: str = field(init=False, default="run_started")


@dataclass
class DefaultsChosen(Event):
    """The settings the run chose itself, from the dataset and the weights: [{setting, value, reason}]."""

    choices: list[dict[str, Any]]
    kind: str = field(init=False, default="defaults_chosen")


@dataclass
class LrFound(Event):
    """``lr: auto``: the range test's curve (rates and smoothed losses) and the rate it chose."""

    lr: float
    method: str
    lrs: list[float]
    losses: list[float]
    kind: str = field(init=False, default="lr_found")


@dataclass
class BudgetPlanned(Event):
    """``budget_minutes``: what the throughput probe measured and the epochs it planned."""

    budget_seconds: float
    epochs: int
    train_images_per_sec: float
    eval_images_per_sec: float
    estimated_seconds: float  # the whole run, from its start, as planned
    reason: str
    eta: float | None = None  # seconds left as planned, from now
    kind: str = field(init=False, default="budget_planned")


@dataclass
class BudgetReached(Event):
    """Training stopped before its planned end so the run ends within its budget (evaluated and saved)."""

    epoch: int
    elapsed: float
    budget_seconds: float
    kind: str = field(init=False, default="budget_reached")


@dataclass
class StageStarted(Event):
    stage: str  # "features" | "head" | "finetune"
    description: str
    kind: str = field(init=False, default="stage_started")


@dataclass
class Progress(Event):
    """Coarse progress of work that is not an epoch (decoding images, extracting features)."""

    stage: str
    done: int
    total: int
    kind: str = field(init=False, default="progress")


@dataclass
class BatchEnd(Event):
    epoch: int
    total_epochs: int
    batch: int
    num_batches: int
    loss: float
    accuracy: float
    lr: float
    images_per_sec: float
    elapsed: float
    eta: float | None
    kind: str = field(init=False, default="batch_end")


@dataclass
class EpochEnd(Event):
    epoch: int
    total_epochs: int
    stage: str
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    images_per_sec: float
    epoch_time: float
    elapsed: float
    eta: float | None
    is_best: bool
    kind: str = field(init=False, default="epoch_end")


@dataclass
class CheckpointSaved(Event):
    epoch: int
    path: str
    is_best: bool
    kind: str = field(init=False, default="checkpoint_saved")


@dataclass
class OutOfMemoryRetry(Event):
    """CUDA ran out of memory: the step is retried in smaller micro-batches, same effective batch."""

    epoch: int
    old_micro_batch: int
    new_micro_batch: int
    accumulation_steps: int
    kind: str = field(init=False, default="oom_retry")


@dataclass
class EarlyStopped(Event):
    epoch: int
    best_epoch: int
    monitor: str
    kind: str = field(init=False, default="early_stopped")


@dataclass
class RunFinished(Event):
    run_dir: str
    best_epoch: int
    best_metric: float
    monitor: str
    evaluation: dict[str, Any]
    elapsed: float
    kind: str = field(init=False, default="run_finished")


Callback = Callable[[Event], None]
