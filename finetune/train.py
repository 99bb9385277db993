"""The trainer: ``train(config, callbacks)`` and ``resume(run_dir, callbacks)``.

A run is a list of stages over one global epoch count:

- ``frozen``:    head (on cached backbone features)
- ``full``:      finetune (all layers; backbone at ``lr x backbone_lr_mult``)
- ``two-stage``: head, then finetune with discriminative rates (fastai's ``fine_tune`` recipe)

Head epochs run on features computed once (and cached on disk by backbone and image), so they take
milliseconds; their checkpoint is written when the stage ends. Finetune epochs save ``last`` every
epoch (and ``best`` when the monitored metric improves) with optimizer, scheduler and RNG state, so a
resumed run ends exactly where an uninterrupted run with the same seed would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .checkpoint import (
    FORMAT_VERSION,
    RUN_FILE,
    atomic_write_json,
    contiguous_state,
    load_checkpoint,
    read_json,
    save_checkpoint,
)
from .config import TrainConfig
from .dataset import Dataset, DatasetOptions, load_dataset
from .errors import Cancelled, CheckpointError, ConfigError, WeightsError
from .evaluate import metrics_from_logits, predict_logits
from .events import (
    BatchEnd,
    Callback,
    CheckpointSaved,
    EarlyStopped,
    EpochEnd,
    Event,
    OutOfMemoryRetry,
    Progress,
    RunFinished,
    RunStarted,
    StageStarted,
)
from .loader import CachedImages, TrainAugment, batches
from .models import (
    AUX_LOSS_WEIGHT,
    Backbone,
    BuiltModel,
    build_model,
    forward_logits,
    head_module,
    inference_model,
    main_head_name,
    parameter_groups,
    preprocessing_for,
    state_fingerprint,
)
from .pixelcache import PixelCache
from .weights import cached_imagenet_path

log = logging.getLogger(__name__)

StopFlag = Callable[[], bool]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "finetune"


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int
    best_metric: float
    monitor: str
    evaluation: dict[str, Any]
    history: list[dict[str, Any]]


def train(config: TrainConfig, callbacks: Sequence[Callback] = (), should_stop: StopFlag | None = None) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` into the new run directory ``config.out``."""
    config.validate()
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError([f"run directory {out} already exists and is not empty (use --resume to continue it)"])
    return _Run(config, list(callbacks), should_stop).execute(resume_from=None)


def resume(
    run_dir: str | Path,
    callbacks: Sequence[Callback] = (),
    should_stop: StopFlag | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunResult:
    """Continue a run from its ``last`` checkpoint (or from the start if it never finished an epoch).

    ``overrides`` replaces settings of the recorded config that belong to the machine rather than to the run
    (``data``, ``cache_dir``, ``weights_dir``, ``device``...): a run moved to another host, or to a shared
    folder mounted elsewhere, resumes with that host's paths."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / RUN_FILE)
    config = TrainConfig.from_dict({**info["config"], **(overrides or {})}).validate()
    if Path(config.out).resolve() != run_dir.resolve():
        config.out = str(run_dir)
    last = load_checkpoint(run_dir, "last") if (run_dir / "last").exists() else None
    return _Run(config, list(callbacks), should_stop).execute(resume_from=last.path if last else None)


# ------------------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"device {name!r} was asked for but CUDA is not available"])
    return device


def _resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(["precision fp16 needs CUDA; use bf16 or fp32 on the CPU"])
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _seed_for(seed: int, *parts: object) -> int:
    """A reproducible 63-bit seed for one stage/epoch, independent of everything that ran before."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def versions() -> dict[str, str]:
    import torchvision

    return {
        "finetune": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


@dataclass
class _BestTracker:
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
class _Stage:
    name: str  # "head" | "finetune"
    first_epoch: int  # global, 1-based
    epochs: int
    discriminative: bool = False

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    epoch_times: dict[str, list[float]] = field(default_factory=lambda: {"head": [], "finetune": []})

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class _Run:
    def __init__(self, config: TrainConfig, callbacks: list[Callback], should_stop: StopFlag | None) -> None:
        self.config = config
        self.callbacks = callbacks
        self.should_stop = should_stop or (lambda: False)
        self.run_dir = Path(config.out)
        self.cache_root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.device = _resolve_device(config.device)
        self.amp_dtype = _resolve_precision(config.precision, self.device)
        self.channels_last = config.channels_last if config.channels_last is not None else True
        self.strategy = config.resolved_strategy()
        self.history: list[dict[str, Any]] = []
        self.tracker = _BestTracker(config.monitor, config.early_stopping)
        self.clock = _Clock()
        self.micro_batch = config.batch_size

    # -- plumbing --------------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        for cb in self.callbacks:
            cb(event)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def check_stop(self) -> None:
        if self.should_stop():
            raise Cancelled("training was cancelled; the last checkpoint is intact and can be resumed")

    def stages(self) -> list[_Stage]:
        c = self.config
        if self.strategy == "frozen":
            return [_Stage("head", 1, c.epochs)]
        if self.strategy == "full":
            return [_Stage("finetune", 1, c.epochs)]
        return [_Stage("head", 1, c.head_epochs), _Stage("finetune", c.head_epochs + 1, c.epochs, discriminative=True)]

    # -- the run ---------------------------------------------------------------------------------------
    def execute(self, resume_from: Path | None) -> RunResult:
        c = self.config
        torch.manual_seed(c.seed)
        self.check_weights()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dataset = self.load_data()
        self.built = self.load_model()
        # Written only once the model is built: a run that fails before leaves its folder empty, so the
        # same command can simply be run again (train refuses a non-empty folder).
        atomic_write_json(self.run_dir / "dataset.json", self.dataset.report())
        self.model = self.built.model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        start_epoch = 0
        resumed_state: dict[str, Any] | None = None
        if resume_from is not None:
            start_epoch, resumed_state = self.restore(resume_from)
        self.write_run_info(status="running")
        stages = self.stages()
        total_epochs = stages[-1].last_epoch
        self.emit(
            RunStarted(
                str(self.run_dir),
                c.model,
                self.strategy,
                self.dataset.num_classes,
                len(self.train_images),
                len(self.val_images),
                len(self.test_images),
                total_epochs,
                str(self.device),
                resumed_from_epoch=start_epoch,
            )
        )
        try:
            for stage in stages:
                if stage.last_epoch <= start_epoch:
                    continue
                self.tracker.reset_patience()
                if stage.name == "head":
                    self.run_head_stage(stage, total_epochs)
                else:
                    self.run_finetune_stage(stage, total_epochs, start_epoch, resumed_state)
                    resumed_state = None
                if self.tracker.should_stop:
                    self.emit(EarlyStopped(self.history[-1]["epoch"], self.tracker.best_epoch, c.monitor))
                    if stage is not stages[-1]:
                        # Early stopping ends a stage; the next stage still runs from the best weights.
                        continue
        except Cancelled:
            self.write_run_info(status="cancelled")
            raise
        except BaseException as e:
            self.write_run_info(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        evaluation = self.final_evaluation()
        self.write_run_info(status="succeeded", evaluation=evaluation)
        best_value = float(self.tracker.best if self.tracker.best is not None else float("nan"))
        self.emit(
            RunFinished(
                str(self.run_dir), self.tracker.best_epoch, best_value, c.monitor, evaluation, self.clock.elapsed
            )
        )
        return RunResult(self.run_dir, self.tracker.best_epoch, best_value, c.monitor, evaluation, self.history)

    def load_data(self) -> Dataset:
        c = self.config
        self.prep = preprocessing_for(c.model, c.weights, c.image_size)
        self.pixels = PixelCache(self.cache_root / "pixels", self.prep.resize_size)
        self.emit(StageStarted("data", f"checking images and caching pixels at {self.prep.resize_size}px"))
        dataset = load_dataset(
            c.data,
            options=DatasetOptions(val_fraction=c.val_fraction, test_fraction=c.test_fraction, seed=c.seed),
            pixel_cache=self.pixels,
            extract_dir=self.cache_root / "extracted",
            progress=lambda done, total: self.emit(Progress("data", done, total)),
        )
        self.train_images = CachedImages(self.pixels, dataset.split("train"))
        self.val_images = CachedImages(self.pixels, dataset.split("val"))
        self.test_images = CachedImages(self.pixels, dataset.split("test"))
        if len(self.val_images) == 0:
            raise ConfigError(["the dataset has no validation images"])
        return dataset

    def check_weights(self) -> None:
        """Missing weights fail at once, not after the dataset pass (which can take minutes)."""
        c = self.config
        if c.weights == "imagenet":
            cached_imagenet_path(c.model, c.weights_dir)
        elif c.weights != "none" and not Path(c.weights).is_file():
            raise WeightsError(f"weights file not found: {c.weights}")

    def load_model(self) -> BuiltModel:
        c = self.config
        torch.manual_seed(c.seed)  # the new head's initialisation depends only on the seed
        return build_model(
            c.model, self.dataset.num_classes, c.weights, image_size=c.image_size, weights_dir=c.weights_dir
        )

    # -- metadata --------------------------------------------------------------------------------------
    def model_meta(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "arch": self.config.model,
            "num_classes": self.dataset.num_classes,
            "class_names": self.dataset.classes,
            "preprocessing": self.prep.to_dict(),
            "transform_input": self.built.transform_input,
            "weights_source": self.built.weights_source,
            "strategy": self.strategy,
            "config": self.config.to_dict(),
            "dataset_fingerprint": self.dataset.fingerprint,
            "versions": versions(),
        }

    def write_run_info(
        self, *, status: str, evaluation: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        path = self.run_dir / RUN_FILE
        previous = read_json(path) if path.exists() else {}
        info = {
            **previous,
            **self.model_meta(),
            "status": status,
            "history": self.history,
            "best_epoch": self.tracker.best_epoch,
            "best_metric": self.tracker.best,
            "monitor": self.config.monitor,
            "dataset": self.dataset.report(include_files=False),
            "created_at": previous.get("created_at") or _now(),
            "updated_at": _now(),
            "error": error,
        }
        if evaluation is not None:
            info["evaluation"] = evaluation
        atomic_write_json(path, info)

    # -- checkpoints -----------------------------------------------------------------------------------
    def save(
        self,
        epoch: int,
        stage: str,
        *,
        is_best: bool,
        update_last: bool = True,
        model_state: dict[str, torch.Tensor] | None = None,
        train_state: dict[str, Any] | None = None,
    ) -> None:
        meta = {
            **self.model_meta(),
            "epoch": epoch,
            "stage": stage,
            "history": self.history,
            "best": self.tracker.state(),
            "saved_at": _now(),
        }
        path = save_checkpoint(
            self.run_dir,
            epoch,
            model_state or contiguous_state(self.model),
            meta,
            train_state,
            is_best=is_best,
            update_last=update_last,
            keep_last=self.config.keep_last,
        )
        self.emit(CheckpointSaved(epoch, str(path), is_best))

    def restore(self, ckpt_dir: Path) -> tuple[int, dict[str, Any]]:
        ckpt = load_checkpoint(ckpt_dir)
        if ckpt.meta["dataset_fingerprint"] != self.dataset.fingerprint:
            raise CheckpointError(
                "the dataset changed since this run started (different files, labels or split); "
                "start a new run instead of resuming"
            )
        self.model.load_state_dict(ckpt.state_dict())
        state = ckpt.train_state()
        self.history = list(ckpt.meta["history"])
        self.tracker.load(ckpt.meta["best"])
        self.micro_batch = int(state.get("micro_batch", self.config.batch_size))
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        return ckpt.epoch, state

    def rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    # -- stage 1: the head on cached features ----------------------------------------------------------
    def features(self) -> dict[str, torch.Tensor]:
        """Backbone features of every image (eval preprocessing), computed once and cached on disk."""
        from safetensors.torch import load_file, save_file

        backbone = Backbone(self.model, self.config.model).eval()
        key_src = json.dumps(
            {
                "backbone": state_fingerprint(self.model, exclude_prefix=main_head_name(self.config.model) + "."),
                "arch": self.config.model,
                "prep": self.prep.to_dict(),
                "amp": str(self.amp_dtype),
                "transform_input": self.built.transform_input,
                "images": [s.sha256 for s in self.dataset.samples],
            },
            sort_keys=True,
        )
        key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
        path = self.cache_root / "features" / f"{key}.safetensors"
        if path.is_file():
            try:
                return dict(load_file(str(path)))
            except Exception:  # a damaged cache entry is recomputed, never trusted
                log.warning("feature cache %s is unreadable; recomputing", path)
        self.emit(StageStarted("features", "computing backbone features once for the frozen head"))
        feats: dict[str, torch.Tensor] = {}
        splits = {"train": self.train_images, "val": self.val_images, "test": self.test_images}
        done = 0
        total = sum(len(v) for v in splits.values())
        for name, images in splits.items():
            if len(images) == 0:
                continue
            parts = []
            for chunk in _chunks(list(range(len(images))), 256):
                self.check_stop()
                sub = CachedImages(images.cache, [images.samples[i] for i in chunk])
                logits, _ = predict_logits(
                    backbone,
                    sub,
                    self.prep,
                    self.device,
                    batch_size=64,
                    channels_last=self.channels_last,
                    autocast=self.autocast,
                )
                parts.append(logits)
                done += len(chunk)
                self.emit(Progress("features", done, total))
            feats[name] = torch.cat(parts).contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{time.time_ns()}.tmp")
        save_file(feats, str(tmp))
        tmp.replace(path)
        return feats

    def run_head_stage(self, stage: _Stage, total_epochs: int) -> None:
        c = self.config
        self.emit(StageStarted("head", f"training the new head on cached features for {stage.epochs} epochs"))
        feats = {k: v.to(self.device) for k, v in self.features().items()}
        x_train, y_train = feats["train"], self.train_images.labels.to(self.device)
        x_val, y_val = feats["val"], self.val_images.labels.to(self.device)
        head = head_module(self.model, c.model)
        lr = c.resolved_head_lr()
        optimizer = _make_optimizer(c, _decay_groups([list(head.parameters())], [lr], c.weight_decay))
        steps_per_epoch = math.ceil(len(x_train) / c.batch_size)
        scheduler = _make_scheduler(c, optimizer, steps_per_epoch, stage.epochs)
        best_head: dict[str, torch.Tensor] | None = None
        for epoch in range(stage.first_epoch, stage.last_epoch + 1):
            t0 = time.perf_counter()
            head.train()
            gen = torch.Generator().manual_seed(_seed_for(c.seed, "head", epoch))
            loss_sum = correct = seen = 0.0
            for idx in batches(len(x_train), c.batch_size, generator=gen):
                self.check_stop()
                xb, yb = x_train[idx], y_train[idx]
                logits = head(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=c.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(idx)
                correct += (logits.argmax(1) == yb).sum().item()
                seen += len(idx)
            train_time = time.perf_counter() - t0
            head.eval()
            with torch.no_grad():
                val_logits = head(x_val)
            metrics = {
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "val_loss": F.cross_entropy(val_logits, y_val).item(),
                "val_acc": (val_logits.argmax(1) == y_val).float().mean().item(),
            }
            is_best = self.end_epoch(
                stage, epoch, total_epochs, metrics, optimizer, seen, train_time, time.perf_counter() - t0
            )
            if is_best:
                best_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
            if self.tracker.should_stop:
                break
        # The stage's checkpoints: best (the best head) and last. Epochs on features are so short that
        # saving once per stage, not per epoch, is what keeps them fast.
        last_epoch = self.history[-1]["epoch"]
        state = {"stage": "head", "micro_batch": self.micro_batch, "rng": self.rng_state()}
        if best_head is not None and self.tracker.best_epoch != last_epoch:
            final_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
            head.load_state_dict(best_head)
            self.save(self.tracker.best_epoch, "head", is_best=True, update_last=False)
            if self.strategy != "two-stage":
                head.load_state_dict(final_head)
            # two-stage unfreezes from the best head; "last" holds exactly what stage 2 starts from.
        self.save(last_epoch, "head", is_best=self.tracker.best_epoch == last_epoch, train_state=state)

    # -- stage 2: all layers ---------------------------------------------------------------------------
    def run_finetune_stage(
        self, stage: _Stage, total_epochs: int, start_epoch: int, resumed_state: dict[str, Any] | None
    ) -> None:
        c = self.config
        self.emit(StageStarted("finetune", f"fine-tuning all layers for {stage.epochs} epochs"))
        lrs, groups = self.finetune_rates(stage)
        optimizer = _make_optimizer(c, _decay_groups(groups, lrs, c.weight_decay))
        n_batches = len(batches(len(self.train_images), c.batch_size, drop_last=True))
        scheduler = _make_scheduler(c, optimizer, n_batches, stage.epochs)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        first = stage.first_epoch
        if resumed_state is not None and resumed_state.get("stage") == "finetune":
            optimizer.load_state_dict(resumed_state["optimizer"])
            scheduler.load_state_dict(resumed_state["scheduler"])
            scaler.load_state_dict(resumed_state["scaler"])
            first = start_epoch + 1
        step_model: Callable[[torch.Tensor], Any] = self.model
        if c.compile:
            step_model = torch.compile(self.model)
        augment = TrainAugment(self.prep, self.device, self.channels_last, scale=(c.crop_scale_min, 1.0), hflip=c.hflip)
        for epoch in range(first, stage.last_epoch + 1):
            t0 = time.perf_counter()
            self.model.train()
            gen = torch.Generator().manual_seed(_seed_for(c.seed, "finetune", epoch))
            order = batches(len(self.train_images), c.batch_size, generator=gen, drop_last=True)
            loss_sum = correct = seen = 0.0
            for b, (x, y) in enumerate(augment.batches(self.train_images, order, gen), 1):
                self.check_stop()
                loss, n_correct = self.train_step(step_model, optimizer, scaler, x, y, epoch)
                scheduler.step()
                loss_sum += loss * len(y)
                correct += n_correct
                seen += len(y)
                elapsed = time.perf_counter() - t0
                self.emit(
                    BatchEnd(
                        epoch,
                        total_epochs,
                        b,
                        len(order),
                        loss_sum / seen,
                        correct / seen,
                        optimizer.param_groups[-1]["lr"],
                        seen / elapsed,
                        self.clock.elapsed,
                        self.eta(stage, epoch, total_epochs, b / len(order), elapsed),
                    )
                )
            train_time = time.perf_counter() - t0
            val_logits, val_labels = predict_logits(
                self.model,
                self.val_images,
                self.prep,
                self.device,
                batch_size=max(64, c.batch_size),
                channels_last=self.channels_last,
                autocast=self.autocast,
            )
            metrics = {
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "val_loss": F.cross_entropy(val_logits, val_labels).item(),
                "val_acc": (val_logits.argmax(1) == val_labels).float().mean().item(),
            }
            is_best = self.end_epoch(
                stage, epoch, total_epochs, metrics, optimizer, seen, train_time, time.perf_counter() - t0
            )
            state = {
                "stage": "finetune",
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "micro_batch": self.micro_batch,
                "rng": self.rng_state(),
            }
            self.save(epoch, "finetune", is_best=is_best, train_state=state)
            if self.tracker.should_stop:
                break

    def finetune_rates(self, stage: _Stage) -> tuple[list[float], list[list[nn.Parameter]]]:
        c = self.config
        groups = parameter_groups(self.model, c.model)
        lr = c.resolved_lr()
        if stage.discriminative:
            # fastai's fine_tune: after the head stage, halve the rate and spread it geometrically from
            # base/100 at the input to base at the head.
            base = lr / 2
            n = len(groups)
            lrs = [base / 100 * (100 ** (i / (n - 1))) for i in range(n)]
        else:
            mult = c.resolved_backbone_lr_mult()
            lrs = [lr * mult] * (len(groups) - 1) + [lr]
        return lrs, groups

    def train_step(
        self,
        model: Callable[[torch.Tensor], Any],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int,
    ) -> tuple[float, int]:
        """One optimizer step on (x, y). On CUDA out-of-memory the batch is split into micro-batches with
        gradient accumulation (same effective batch), halving down to ``min_batch_size``."""
        while True:
            try:
                return self._accumulate(model, optimizer, scaler, x, y)
            except torch.cuda.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                new = self.micro_batch // 2
                if new < self.config.min_batch_size:
                    raise
                self.emit(OutOfMemoryRetry(epoch, self.micro_batch, new, math.ceil(len(y) / new)))
                self.micro_batch = new

    def _accumulate(
        self,
        model: Callable[[torch.Tensor], Any],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[float, int]:
        c = self.config
        optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        correct = 0
        n = len(y)
        for start in range(0, n, self.micro_batch):
            xb, yb = x[start : start + self.micro_batch], y[start : start + self.micro_batch]
            with self.autocast():
                logits, aux = forward_logits(model, xb)  # type: ignore[arg-type]
                loss = F.cross_entropy(logits, yb, label_smoothing=c.label_smoothing)
                aux_loss = sum(
                    (F.cross_entropy(a, yb, label_smoothing=c.label_smoothing) for a in aux),
                    torch.zeros((), device=self.device),
                )
            scaler.scale((loss + AUX_LOSS_WEIGHT * aux_loss) * (len(yb) / n)).backward()
            total_loss += loss.item() * len(yb)  # .item() syncs; it is once per micro-batch
            correct += int((logits.argmax(1) == yb).sum().item())
        scaler.step(optimizer)
        scaler.update()
        return total_loss / n, correct

    # -- bookkeeping -----------------------------------------------------------------------------------
    def end_epoch(
        self,
        stage: _Stage,
        epoch: int,
        total_epochs: int,
        metrics: dict[str, float],
        optimizer: torch.optim.Optimizer,
        seen: float,
        train_time: float,
        epoch_time: float,
    ) -> bool:
        """Record an epoch. ``images_per_sec`` is training throughput (validation excluded);
        ``epoch_time`` is the whole epoch."""
        is_best = self.tracker.update(epoch, metrics)
        self.clock.epoch_times[stage.name].append(epoch_time)
        lr = optimizer.param_groups[-1]["lr"]
        record = {
            "epoch": epoch,
            "stage": stage.name,
            **metrics,
            "lr": lr,
            "epoch_time": epoch_time,
            "images_per_sec": seen / max(train_time, 1e-9),
        }
        self.history.append(record)
        self.emit(
            EpochEnd(
                epoch,
                total_epochs,
                stage.name,
                metrics["train_loss"],
                metrics["train_acc"],
                metrics["val_loss"],
                metrics["val_acc"],
                lr,
                record["images_per_sec"],
                epoch_time,
                self.clock.elapsed,
                self.eta(stage, epoch, total_epochs, 1.0, epoch_time),
                is_best,
            )
        )
        return is_best

    def eta(
        self, stage: _Stage, epoch: int, total_epochs: int, fraction: float, elapsed_in_epoch: float
    ) -> float | None:
        """Seconds left: this epoch's remainder plus remaining epochs at this stage's average epoch time."""
        if fraction <= 0:
            return None
        times = self.clock.epoch_times[stage.name]
        per_epoch = (sum(times) / len(times)) if times and fraction >= 1 else elapsed_in_epoch / fraction
        remaining_here = 0.0 if fraction >= 1 else per_epoch * (1 - fraction)
        return remaining_here + per_epoch * (total_epochs - epoch)

    # -- the end ---------------------------------------------------------------------------------------
    def final_evaluation(self) -> dict[str, Any]:
        best = load_checkpoint(self.run_dir, "best")
        self.model.load_state_dict(best.state_dict())
        model = inference_model(self.model)  # exactly what the predictor will run
        evaluation: dict[str, Any] = {"checkpoint": best.path.name, "epoch": best.epoch}
        for name, images in (("val", self.val_images), ("test", self.test_images)):
            if len(images) == 0:
                continue
            logits, labels = predict_logits(
                model,
                images,
                self.prep,
                self.device,
                batch_size=max(64, self.config.batch_size),
                channels_last=self.channels_last,
                autocast=self.autocast,
            )
            evaluation[name] = metrics_from_logits(logits, labels, self.dataset.classes)
        report = {
            "evaluation": evaluation,
            "history": self.history,
            "dataset": self.dataset.report(include_files=False),
            "best_epoch": self.tracker.best_epoch,
            "monitor": self.config.monitor,
        }
        atomic_write_json(self.run_dir / "report.json", report)
        return evaluation


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _decay_groups(groups: list[list[nn.Parameter]], lrs: list[float], weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: weight decay on weights only, never on biases and norm layers."""
    out = []
    for params, lr in zip(groups, lrs, strict=True):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if no_decay:
            out.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        if decay:
            out.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    return out


def _make_optimizer(c: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=groups[-1]["lr"], momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0)
    if c.optimizer == "adam":
        return torch.optim.Adam(groups, lr=groups[-1]["lr"])
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=groups[-1]["lr"])
    return torch.optim.RMSprop(groups, lr=groups[-1]["lr"], momentum=c.momentum, alpha=0.9, eps=1e-3)


def _make_scheduler(
    c: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule over ``epochs`` epochs."""
    total = max(1, steps_per_epoch * epochs)
    if c.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total + 1,
            pct_start=0.25,
            cycle_momentum=c.optimizer in ("sgd", "rmsprop") and c.momentum > 0,
        )
    if c.schedule == "step":
        step_epochs = c.step_size

        def factor(step: int) -> float:
            return float(c.gamma ** ((step // max(steps_per_epoch, 1)) // step_epochs))
    elif c.schedule == "cosine":
        warmup = min(round(c.warmup_epochs * steps_per_epoch), total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    else:

        def factor(step: int) -> float:
            return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_run_info(run_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / RUN_FILE)


__all__ = ["RunResult", "load_run_info", "resume", "train", "versions"]
