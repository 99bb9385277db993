"""A run's description and results: what every checkpoint says about its model, ``run.json`` (the run
and where it stands, rewritten at each change of status) and ``report.json`` (the final evaluation)."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import FORMAT_VERSION, RUN_FILE, atomic_write_json, read_json
from .config import TrainConfig
from .dataset import Dataset
from .models import BuiltModel, Preprocessing
from .runstate import RunState

REPORT_FILE = "report.json"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    import torchvision

    return {
        "finetune": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def model_meta(config: TrainConfig, dataset: Dataset, prep: Preprocessing, built: BuiltModel) -> dict[str, Any]:
    """What the predictor and any reader need to know about the model (in every checkpoint and run.json)."""
    return {
        "format_version": FORMAT_VERSION,
        "arch": config.model,
        "num_classes": dataset.num_classes,
        "class_names": dataset.classes,
        "preprocessing": prep.to_dict(),
        "transform_input": built.transform_input,
        "weights_source": built.weights_source,
        "strategy": config.resolved_strategy(),
        "config": config.to_dict(),
        "dataset_fingerprint": dataset.fingerprint,
        "versions": versions(),
    }


class RunInfo:
    def __init__(
        self,
        run_dir: Path,
        meta: dict[str, Any],
        dataset: Dataset,
        monitor: str,
        extras: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.meta = meta
        # Facts of the run's start that only run.json keeps (not every checkpoint): the defaults chosen with
        # their reasons, the learning-rate range test's curve, the budget's plan.
        self.extras = extras or {}
        self.dataset = dataset
        self.monitor = monitor
        self.training = training or {}  # devices, batch per device and per step, learning rate

    def write(
        self, state: RunState, *, status: str, evaluation: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        path = self.run_dir / RUN_FILE
        previous = read_json(path) if path.exists() else {}
        info = {
            **previous,
            **self.extras,
            **self.meta,
            "status": status,
            "history": state.history,
            "best_epoch": state.tracker.best_epoch,
            "best_metric": state.tracker.best,
            "monitor": self.monitor,
            "training": self.training,
            "dataset": self.dataset.report(include_files=False),
            "created_at": previous.get("created_at") or now(),
            "updated_at": now(),
            "error": error,
        }
        if evaluation is not None:
            info["evaluation"] = evaluation
        atomic_write_json(path, info)

    def write_report(
        self, state: RunState, evaluation: dict[str, Any], *, misclassified: dict[str, Any] | None = None
    ) -> None:
        """``report.json``: the evaluation, and the test images the model got wrong (``misclassified``:
        dataset-relative paths, kept here rather than in ``run.json`` and the service's database)."""
        report = {
            "evaluation": evaluation,
            "history": state.history,
            "dataset": self.dataset.report(include_files=False),
            "best_epoch": state.tracker.best_epoch,
            "monitor": self.monitor,
            "misclassified": misclassified,
        }
        atomic_write_json(self.run_dir / REPORT_FILE, report)
