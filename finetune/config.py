"""The training configuration: one dataclass whose fields carry their ranges and help.

``TrainConfig.validate()`` checks every value and reports every problem at once. The CLI builds its
options from the same field metadata and the web service validates job requests with it, so a range is
written down exactly once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

STRATEGIES = ("auto", "frozen", "full", "two-stage")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("cosine", "step", "onecycle", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MONITORS = ("val_acc", "val_loss")
DEFAULT_EPOCHS = 10
SYNC_BATCHNORM_NEEDS = "runs on GPUs only (PyTorch's SyncBatchNorm has no CPU implementation)"


def _f(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    tunable: bool = True,
) -> Any:
    """A dataclass field with the metadata the CLI, the API and ``validate`` read."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "tunable": tunable}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults give good accuracy on a typical folder without tuning."""

    data: str = _f("", "dataset folder or .zip (one sub-folder per class)", tunable=False)
    out: str = _f("", "run directory to create", tunable=False)
    model: str = _f(
        "resnet18",
        "architecture",
        choices=("alexnet", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "lenet"),
    )
    weights: str = _f("imagenet", "imagenet (cached torchvision weights), none (random init) or a file path")
    strategy: str = _f(
        "auto",
        "frozen: train the head on cached features; full: all layers, backbone at a "
        "lower rate; two-stage: head first, then all layers with discriminative rates; "
        "auto: two-stage with pretrained weights, full without",
        choices=STRATEGIES,
    )
    epochs: int | None = _f(
        None,
        "epochs (for two-stage: epochs after unfreezing; default: 10 with pretrained weights; from random "
        "initialisation, enough for about 2,000 optimizer steps, 10 to 30 epochs)",
        min=1,
        max=1000,
    )
    head_epochs: int = _f(10, "two-stage: epochs of head training on cached features first", min=1, max=1000)
    batch_size: int = _f(32, "images per optimizer step", min=1, max=4096)
    image_size: int | None = _f(
        None,
        "crop size in pixels (default: the architecture's, 224 (lenet 32), with pretrained weights; from random "
        "initialisation, near the images' median size: never more than 2x it nor more than the architecture's)",
        min=16,
        max=1024,
    )
    optimizer: str = _f("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float | str | None = _f(
        None,
        "learning rate of the new head (default: 1e-3 for adam/adamw/rmsprop, 1e-2 for sgd; 10x that when "
        "the head trains alone on cached features: frozen, and two-stage's first stage); auto: a range test "
        "on the training images before the run picks it",
        min=1e-7,
        max=10.0,
    )
    backbone_lr_mult: float | None = _f(
        None,
        "full strategy: backbone rate = lr x this (default 0.1 with pretrained weights, 1 without)",
        min=0.0,
        max=1.0,
    )
    momentum: float = _f(0.9, "momentum (sgd, rmsprop)", min=0.0, max=0.999)
    nesterov: bool = _f(False, "Nesterov momentum (sgd)")
    weight_decay: float = _f(1e-4, "weight decay", min=0.0, max=1.0)
    schedule: str = _f(
        "cosine", "learning-rate schedule: cosine with warmup, step, one-cycle, constant", choices=SCHEDULES
    )
    warmup_epochs: float = _f(1.0, "cosine: linear warmup length in epochs", min=0.0, max=100.0)
    step_size: int = _f(7, "step: epochs between decays", min=1, max=1000)
    gamma: float = _f(0.1, "step: decay factor", min=0.0, max=1.0)
    label_smoothing: float | None = _f(
        None,
        "label smoothing (default: 0.1 with pretrained weights and at least 100 images per class, else 0)",
        min=0.0,
        max=0.5,
    )
    early_stopping: int = _f(0, "stop after this many epochs without improvement (0: off)", min=0, max=1000)
    monitor: str = _f("val_acc", "validation metric for best checkpoint and early stopping", choices=MONITORS)
    crop_scale_min: float | None = _f(
        None,
        "random resized crop: smallest crop area fraction (default: 0.25 with pretrained weights; from random "
        "initialisation, by image size and images per class: mild, 0.6-0.85, for small images)",
        min=0.01,
        max=1.0,
    )
    hflip: bool | None = _f(
        None, "random horizontal flips (default: on, except from random initialisation on images under 64 px)"
    )
    budget_minutes: float | None = _f(
        None,
        "time budget of the whole run in minutes: a throughput probe on the run's device picks the epochs "
        "(at most epochs; and a smaller image size when the run chose it and fewer than 5 epochs fit) so it "
        "ends within it, and training stops early, evaluated and saved, if it would not",
        min=0.05,
        max=100000.0,
    )
    val_fraction: float = _f(0.1, "validation share when the folder has no split", min=0.01, max=0.5)
    test_fraction: float = _f(0.1, "test share when the folder has no split (0: no test set)", min=0.0, max=0.5)
    seed: int = _f(0, "random seed (split, initialisation, order, augmentation)", min=0, max=2**31 - 1)
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    devices: int = _f(
        1,
        "data-parallel processes (one per GPU; gloo processes on a CPU host), started through torchrun; "
        "batch_size is per device, so the global batch is batch_size x devices",
        min=1,
        max=64,
    )
    sync_batchnorm: bool = _f(
        False,
        "devices > 1 on GPUs: batch-norm statistics over the global batch (SyncBatchNorm) instead of each device's "
        "share; helps when the batch per device is small, at the cost of a collective per batch-norm layer",
    )
    precision: str = _f("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS)
    channels_last: bool | None = _f(None, "channels-last memory layout (default on; faster on CUDA and on modern CPUs)")
    compile: bool = _f(False, "torch.compile the model (slow start, faster steps on long runs)")
    keep_last: int = _f(1, "epoch checkpoints to keep besides best", min=1, max=1000)
    min_batch_size: int = _f(1, "CUDA out of memory: smallest micro-batch to retry with", min=1, max=4096)
    cache_dir: str | None = _f(
        None, "cache folder for decoded pixels, features and extracted zips (default ~/.cache/finetune)", tunable=False
    )
    weights_dir: str | None = _f(None, "folder of torchvision weight files (default: torch's cache)", tunable=False)
    split_file: str | None = _f(
        None,
        'use only the images a JSON Lines file lists ({"path": ..., "split": ...} a line, paths under the '
        "dataset folder): with every split given, that split; with null splits, split with seed and fractions",
        tunable=False,
    )
    cache_max_bytes: int | None = _f(
        None,
        "byte budget of the pixel store in the cache folder (default: $FINETUNE_CACHE_MAX_BYTES, else a fifth "
        "of its disk); least recently used shards are evicted beyond it",
        min=0,
        max=2**60,
        tunable=False,
    )

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        problems: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            if value is None:
                if "None" not in str(f.type):
                    problems.append(f"{f.name} is required")
                continue
            type_problem = _type_problem(f.name, str(f.type), value)
            if type_problem:
                problems.append(type_problem)
                continue
            if meta.get("choices") and value not in meta["choices"]:
                problems.append(f"{f.name} must be one of {', '.join(meta['choices'])}; got {value!r}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            lo, hi = meta.get("min"), meta.get("max")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                problems.append(f"{f.name} must be between {lo:g} and {hi:g}; got {value!r}")
        if not self.data:
            problems.append("data is required (a dataset folder or .zip)")
        if not self.out:
            problems.append("out is required (the run directory to create)")
        if self.val_fraction + self.test_fraction >= 0.9:
            problems.append("val_fraction + test_fraction must leave at least 10% of the images for training")
        if self.model == "lenet" and self.weights == "imagenet":
            problems.append("lenet has no ImageNet weights: use weights=none")
        if self.min_batch_size > self.batch_size:
            problems.append("min_batch_size cannot be larger than batch_size")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.devices > 1:
            if self.resolved_strategy() != "full":
                problems.append(
                    f"devices={self.devices} trains all layers from the start: use strategy full (the {self.resolved_strategy()} "
                    "strategy trains its head on cached features, which runs on one device)"
                )
            if self.device.startswith("cuda:"):
                problems.append("devices > 1 takes one card per process: use device auto or cuda, not cuda:N")
            # Each rank would run its own range test or throughput probe and could decide differently.
            if self.lr == "auto":
                problems.append("lr auto runs its range test on one device: give a number with devices > 1")
            if self.budget_minutes is not None:
                problems.append("budget_minutes plans the run on one device: leave it out with devices > 1")
        if self.sync_batchnorm:
            if self.devices <= 1:
                problems.append("sync_batchnorm shares batch-norm statistics between devices: use it with devices > 1")
            if self.device == "cpu":
                problems.append(f"sync_batchnorm {SYNC_BATCHNORM_NEEDS}: leave it out with device cpu")
        if self.image_size is not None:
            from .models import MIN_IMAGE_SIZE, MIN_IMAGE_SIZE_DEFAULT

            smallest = MIN_IMAGE_SIZE.get(self.model, MIN_IMAGE_SIZE_DEFAULT)
            if self.image_size < smallest:
                problems.append(f"image_size must be at least {smallest} for {self.model}; got {self.image_size}")
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"

    def resolved_strategy(self) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "two-stage" if self.pretrained else "full"

    def resolved_epochs(self) -> int:
        """The epochs of the run (``finetune.defaults`` chooses them from the data when left open)."""
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS

    def resolved_lr(self) -> float:
        if isinstance(self.lr, int | float):
            return float(self.lr)
        if self.lr == "auto":
            raise ValueError("lr is auto: the range test (finetune.lrfind) sets it before training")
        return 1e-2 if self.optimizer == "sgd" else 1e-3

    def resolved_head_lr(self) -> float:
        """The rate of a head trained alone on cached features. A linear layer on fixed features takes a
        higher rate than a network being fine-tuned: at 1e-3 (AdamW), 10 epochs left a resnet18 head
        under-trained (0.65 val accuracy in bench's frozen benchmark against 0.71 at 1e-2, and 0.69 for the
        tutorial's fixed-feature extractor, which takes 8x as many optimizer steps at batch 4)."""
        if isinstance(self.lr, int | float):
            return float(self.lr)
        return 10 * self.resolved_lr()

    def resolved_backbone_lr_mult(self) -> float:
        if self.backbone_lr_mult is not None:
            return self.backbone_lr_mult
        return 0.1 if self.pretrained else 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError([f"unknown setting {name!r}" for name in unknown])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _type_problem(name: str, declared: str, value: Any) -> str | None:
    base = declared.replace(" | None", "")
    if base == "float | str":  # a number, or "auto"
        if value == "auto":
            return None
        base = "float"
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN
    else:
        ok = isinstance(value, str)
    return None if ok else f"{name} must be of type {base}; got {value!r}"


def parse_rate(text: str) -> float | str:
    """A learning rate as the CLI takes it: a number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number nor auto: {text!r}") from None


def hyperparameters() -> list[dict[str, Any]]:
    """Field name, type, default, range, choices and help for every tunable setting (for forms and docs)."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("tunable", True):
            continue
        out.append(
            {
                "name": f.name,
                # "rate": a number or "auto"
                "type": str(f.type).replace(" | None", "").replace("float | str", "rate"),
                "optional": "None" in str(f.type),
                "default": f.default,
                "min": f.metadata.get("min"),
                "max": f.metadata.get("max"),
                "choices": list(f.metadata["choices"]) if f.metadata.get("choices") else None,
                "help": f.metadata.get("help", ""),
            }
        )
    return out
