"""Where a run stands: its plan of stages, the epochs done, the best epoch so far, and where it goes on.

A run is a list of stages over one global epoch count, planned from the config alone:

- ``frozen``:    head (on cached backbone features)
- ``full``:      finetune (all layers; backbone at ``lr x backbone_lr_mult``)
- ``two-stage``: head, then finetune with discriminative rates (fastai's ``fine_tune`` recipe)

A stage ends after its last epoch or when early stopping ends it; either way it is *finished*, and the
next stage starts at its own first epoch (so after a head stage stopped early at epoch 3 of 10, fine-tuning
starts at epoch 11). ``RunState`` goes into every checkpoint's metadata: a resumed run never re-enters a
finished stage, goes on at ``next_epoch``, and its epoch numbers only ever increase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import TrainConfig


@dataclass
class Stage:
    name: str  # "head" | "finetune"
    first_epoch: int  # global, 1-based
    epochs: int
    discriminative: bool = False

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1


def plan_stages(config: TrainConfig) -> list[Stage]:
    strategy = config.resolved_strategy()
    if strategy == "frozen":
        return [Stage("head", 1, config.resolved_epochs())]
    if strategy == "full":
        return [Stage("finetune", 1, config.resolved_epochs())]
    head = Stage("head", 1, config.head_epochs)
    return [head, Stage("finetune", head.last_epoch + 1, config.resolved_epochs(), discriminative=True)]


@dataclass
class BestTracker:
    monitor: str
    patience: int
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        value = metrics[self.monitor]
        better = self.best is None or (value > self.best if self.monitor == "val_acc" else value < self.best)
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    def reset_patience(self) -> None:
        self.bad_epochs = 0

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


@dataclass
class RunState:
    tracker: BestTracker
    micro_batch: int  # smaller than the batch after a CUDA out-of-memory retry
    history: list[dict[str, Any]] = field(default_factory=list)
    finished_stages: list[str] = field(default_factory=list)
    next_epoch: int = 1

    @property
    def last_epoch(self) -> int:
        """The last epoch done (0 before the first)."""
        return int(self.history[-1]["epoch"]) if self.history else 0

    def epochs_to_run(self, stage: Stage) -> range:
        return range(max(stage.first_epoch, self.next_epoch), stage.last_epoch + 1)

    def record(self, entry: dict[str, Any]) -> bool:
        """Add a finished epoch's metrics; returns whether it is the best so far."""
        if entry["epoch"] <= self.last_epoch:
            raise RuntimeError(f"epoch {entry['epoch']} after epoch {self.last_epoch}: epoch numbers only increase")
        self.history.append(entry)
        self.next_epoch = entry["epoch"] + 1
        return self.tracker.update(entry["epoch"], entry)

    def stage_done(self, stage: Stage) -> bool:
        """Whether ``stage`` is over after its latest epoch: all its epochs ran, or early stopping ended it."""
        return self.last_epoch >= stage.last_epoch or self.tracker.should_stop

    def finish(self, stage: Stage) -> None:
        self.finished_stages.append(stage.name)
        self.next_epoch = stage.last_epoch + 1

    def to_meta(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "best": self.tracker.state(),
            "resume": {"finished_stages": self.finished_stages, "next_epoch": self.next_epoch},
        }

    def load(self, meta: dict[str, Any], train_state: dict[str, Any], stages: list[Stage]) -> None:
        self.history = list(meta["history"])
        self.tracker.load(meta["best"])
        self.micro_batch = int(train_state.get("micro_batch", self.micro_batch))
        if "resume" in meta:
            self.finished_stages = list(meta["resume"]["finished_stages"])
            self.next_epoch = int(meta["resume"]["next_epoch"])
        else:
            self._load_older(meta, stages)

    def _load_older(self, meta: dict[str, Any], stages: list[Stage]) -> None:
        """A checkpoint written before ``resume`` was recorded: a head checkpoint was only ever written when
        its stage ended; a fine-tune one ended its stage at the stage's last epoch or by early stopping."""
        epoch = int(meta["epoch"])
        current = next(s for s in stages if s.name == meta["stage"])
        self.finished_stages = [s.name for s in stages if s.last_epoch < current.first_epoch]
        self.next_epoch = epoch + 1
        if current.name == "head" or epoch >= current.last_epoch or self.tracker.should_stop:
            self.finish(current)
