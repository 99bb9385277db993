"""The trainer: ``train(config, callbacks)`` and ``resume(run_dir, callbacks)``.

A run checks its data and builds its model, then runs the stages its config plans (``runstate``): the
head alone on cached backbone features (``head``), then or instead all layers (``train_one_epoch`` and
``evaluate`` below); at the end it evaluates its best checkpoint on the validation and test images.

Head epochs take milliseconds, so their checkpoint is written when the stage ends. Fine-tune epochs save
``last`` every epoch (and ``best`` when the monitored metric improves) with optimizer, scheduler and RNG
state, so a resumed run ends exactly where an uninterrupted run with the same seed would have. A resumed
run goes on where its ``last`` checkpoint says: a finished stage (also one ended by early stopping) is
never entered again, and epoch numbers only increase.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from .budget import MIN_BUDGET_EPOCHS, BudgetGuard, BudgetPlan, Throughput, plan_epochs, probe, smaller_size
from .calibration import calibrate, calibrated
from .checkpoint import (
    RUN_FILE,
    Checkpoint,
    add_to_meta,
    atomic_write_json,
    contiguous_state,
    load_checkpoint,
    read_json,
    save_checkpoint,
    settle,
)
from .config import TrainConfig
from .dataset import Dataset, DatasetOptions, read_split_file
from .datastore import StoredDataset, load_into_store
from .defaults import Choice, DataFacts, apply_defaults, provisional_image_size
from .distributed import sync_batchnorm
from .errors import Cancelled, CheckpointError, ConfigError, WeightsError
from .evaluate import metrics_from_logits, misclassified, predict_logits, validation_metrics
from .events import (
    BatchEnd,
    BudgetPlanned,
    BudgetReached,
    Callback,
    CheckpointSaved,
    DefaultsChosen,
    EarlyStopped,
    EpochEnd,
    LrFound,
    OutOfMemoryRetry,
    Progress,
    RunFinished,
    RunStarted,
    StageStarted,
)
from .head import HeadTrainer, backbone_features
from .loader import StoredImages, TrainAugment, batches, shard_batches
from .lrfind import find_lr
from .models import (
    AUX_LOSS_WEIGHT,
    MIN_IMAGE_SIZE,
    MIN_IMAGE_SIZE_DEFAULT,
    BuiltModel,
    Preprocessing,
    build_model,
    forward_logits,
    head_module,
    inference_model,
    preprocessing_for,
)
from .optim import Optim, finetune_optim
from .runinfo import RunInfo, model_meta, now, versions
from .runstate import BestTracker, RunState, Stage, plan_stages
from .runtime import Runtime, StopFlag, cache_root, default_cache_dir, seed_for
from .weights import cached_imagenet_path


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
    rt = Runtime.for_config(config, callbacks, should_stop)
    out = Path(config.out)
    taken = out.exists() and any(out.iterdir())
    rt.dist.wait_for_main()  # every rank has looked before rank 0 writes anything there
    if taken:
        rt.dist.close()
        raise ConfigError([f"run directory {out} already exists and is not empty (use --resume to continue it)"])
    return _run(config, rt, resume_from=None)


def resume(
    run_dir: str | Path,
    callbacks: Sequence[Callback] = (),
    should_stop: StopFlag | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunResult:
    """Continue a run from its ``last`` checkpoint (or from the start if it never saved one).

    ``overrides`` replaces settings of the recorded config that belong to the machine rather than to the run
    (``data``, ``cache_dir``, ``weights_dir``, ``device``...): a run moved to another host, or to a shared
    folder mounted elsewhere, resumes with that host's paths."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / RUN_FILE)
    config = TrainConfig.from_dict({**info["config"], **(overrides or {})}).validate()
    if Path(config.out).resolve() != run_dir.resolve():
        config.out = str(run_dir)
    rt = Runtime.for_config(config, callbacks, should_stop)
    if rt.dist.is_main:
        settle(run_dir)  # whatever instant the previous attempt died at
    rt.dist.wait_for_main()
    last = load_checkpoint(run_dir, "last") if (run_dir / "last").exists() else None
    return _run(config, rt, resume_from=last)


def _run(config: TrainConfig, rt: Runtime, resume_from: Checkpoint | None) -> RunResult:
    try:
        torch.manual_seed(config.seed)
        check_weights(config)
        run_dir = Path(config.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        config, data, choices = load_data_ranked(config, rt)
        try:
            built = load_model(config, data.dataset.num_classes)
            # Written only once the model is built: a run that fails before leaves its folder empty, so the
            # same command can simply be run again (train refuses a non-empty folder).
            if rt.dist.is_main:
                atomic_write_json(run_dir / "dataset.json", run_dataset_report(data.dataset, run_dir))
            extras: dict[str, Any] = {"defaults": [c.to_dict() for c in choices]} if resume_from is None else {}
            config, plan = plan_run(config, rt, data, built, extras, fresh=resume_from is None)
            run = _Run(config, rt, data, built, extras, plan)
            if resume_from is not None:
                run.restore(resume_from)
            return run.execute()
        finally:
            data.close()  # unpinned: the pixels stay stored, first in line for eviction when space is needed
    finally:
        rt.dist.close()


def load_data_ranked(config: TrainConfig, rt: Runtime) -> tuple[TrainConfig, RunData, list[Choice]]:
    """``load_data`` on rank 0 first (it checks and stores the images), then on the other ranks, which find
    them stored; rank 0 waits for them so that no rank starts training before every rank holds its data.
    The defaults chosen from the data are the same on every rank: they depend on the data alone."""
    if not rt.dist.enabled:
        return load_data(config, rt.emit)
    loaded = load_data(config, rt.emit) if rt.dist.is_main else None
    rt.dist.wait_for_main()
    if loaded is None:
        loaded = load_data(config, rt.emit)
    rt.dist.wait_for_main()
    return loaded


# -- before the first epoch ----------------------------------------------------------------------------


def check_weights(config: TrainConfig) -> None:
    """Missing weights fail at once, not after the dataset pass (which can take minutes)."""
    if config.weights == "imagenet":
        cached_imagenet_path(config.model, config.weights_dir)
    elif config.weights != "none" and not Path(config.weights).is_file():
        raise WeightsError(f"weights file not found: {config.weights}")


@dataclass
class RunData:
    """A run's images: the checked dataset and the stored pixels of each split, pinned until ``close()``."""

    dataset: Dataset
    prep: Preprocessing
    stored: StoredDataset
    train_images: StoredImages
    val_images: StoredImages
    test_images: StoredImages

    def use_preprocessing(self, prep: Preprocessing) -> None:
        """Read the images for another preprocessing (the budget chose a smaller image size)."""
        if prep.tier != self.stored.tier:
            self.stored.reclaim(prep.tier)
        self.prep = prep
        splits = self.stored.splits
        self.train_images, self.val_images, self.test_images = splits["train"], splits["val"], splits["test"]

    def close(self) -> None:
        self.stored.close()


def load_data(config: TrainConfig, emit: Callback) -> tuple[TrainConfig, RunData, list[Choice]]:
    """All of a run's data loading: check every image, store its pixels (decoded once, at the tier this run
    reads), split, and pin each split in the pixel store. The settings left open that depend on the images
    (``finetune.defaults``) are chosen once their sizes are known: returns the config with them set."""
    c = config
    prep = preprocessing_for(c.model, c.weights, provisional_image_size(c))
    emit(StageStarted("data", f"checking images and storing pixels at {prep.tier}px"))
    stored = load_into_store(
        c.data,
        cache_root=cache_root(c),
        tier=prep.tier,
        options=DatasetOptions(
            val_fraction=c.val_fraction,
            test_fraction=c.test_fraction,
            seed=c.seed,
            files=read_split_file(c.split_file) if c.split_file else None,
        ),
        extract_dir=cache_root(c) / "extracted",
        progress=lambda done, total: emit(Progress("data", done, total)),
        max_bytes=c.cache_max_bytes,
    )
    try:
        c, choices = apply_defaults(c, DataFacts.from_report(stored.dataset.report(include_files=False)))
        if choices:
            emit(DefaultsChosen([choice.to_dict() for choice in choices]))
        prep = preprocessing_for(c.model, c.weights, c.image_size)
        if prep.tier != stored.tier:
            stored.reclaim(prep.tier)
    except BaseException:
        stored.close()
        raise
    splits = stored.splits
    if len(splits["val"]) == 0:
        stored.close()
        raise ConfigError(["the dataset has no validation images"])
    return c, RunData(stored.dataset, prep, stored, splits["train"], splits["val"], splits["test"]), choices


def plan_run(
    config: TrainConfig, rt: Runtime, data: RunData, built: BuiltModel, extras: dict[str, Any], *, fresh: bool
) -> tuple[TrainConfig, BudgetPlan | None]:
    """Before the first epoch: ``lr: auto``'s range test, and ``budget_minutes``' throughput probe and plan
    (a resumed run keeps its rate and epochs, and probes again only for its guard)."""
    model = built.model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.lr == "auto":
        rt.emit(StageStarted("lr_find", "finding the learning rate (range test)"))
        curve = find_lr(model, config, data.train_images, data.prep, rt)
        rt.emit(LrFound(curve.lr, curve.method, curve.lrs, curve.losses))
        extras["lr_finder"] = curve.to_dict()
        config = replace(config, lr=curve.lr)
    if config.budget_minutes is None:
        return config, None
    tp = probe(model, data.train_images, data.val_images, data.prep, config.batch_size, rt)
    budget = config.budget_minutes * 60
    if not fresh:
        return config, BudgetPlan(
            budget, config.resolved_epochs(), tp, budget, "resumed: the epochs planned at the start"
        )
    plan = _budget_plan(config, rt, data, tp)
    config, smaller = _shrink_for_budget(config, rt, data, built, plan, extras)
    if smaller:
        tp = probe(model, data.train_images, data.val_images, data.prep, config.batch_size, rt)
        plan = _budget_plan(config, rt, data, tp)
    rt.emit(
        BudgetPlanned(
            budget,
            plan.epochs,
            tp.train_images_per_sec,
            tp.eval_images_per_sec,
            plan.estimated_seconds,
            plan.reason,
            eta=max(0.0, plan.estimated_seconds - (time.perf_counter() - rt.started)),
        )
    )
    extras["budget"] = {
        "budget_seconds": budget,
        "epochs": plan.epochs,
        "train_images_per_sec": tp.train_images_per_sec,
        "eval_images_per_sec": tp.eval_images_per_sec,
        "estimated_seconds": plan.estimated_seconds,
        "reason": plan.reason,
    }
    return replace(config, epochs=plan.epochs), plan


def _budget_plan(config: TrainConfig, rt: Runtime, data: RunData, tp: Throughput) -> BudgetPlan:
    elapsed = time.perf_counter() - rt.started
    if config.resolved_strategy() != "full":  # the head stage first extracts features: one pass over all
        elapsed += len(data.dataset.samples) / tp.eval_images_per_sec
    return plan_epochs(
        config.budget_minutes * 60 if config.budget_minutes else 0.0,
        elapsed,
        tp,
        len(data.train_images),
        len(data.val_images),
        len(data.test_images),
        config.resolved_epochs(),
    )


def _shrink_for_budget(
    config: TrainConfig, rt: Runtime, data: RunData, built: BuiltModel, plan: BudgetPlan, extras: dict[str, Any]
) -> tuple[TrainConfig, bool]:
    """When the run chose its image size itself and too few epochs fit the budget at it, a smaller size
    (``budget.smaller_size``): the pixels are read at its tier and the choice's reason says why."""
    size_choice = next((c for c in extras.get("defaults", []) if c["setting"] == "image_size"), None)
    if size_choice is None or config.image_size is None:
        return config, False
    want = min(config.resolved_epochs(), MIN_BUDGET_EPOCHS)
    smallest = MIN_IMAGE_SIZE.get(config.model, MIN_IMAGE_SIZE_DEFAULT)
    new = smaller_size(config.image_size, smallest, plan, want)
    if new is None or new == config.image_size:
        return config, False
    budget = f"{config.budget_minutes:g} min"
    size_choice["value"] = new
    size_choice["reason"] = (
        f"image size {new}: at {config.image_size} px only {plan.fit} epochs fit the time budget of {budget} "
        f"({size_choice['reason']})"
    )
    config = replace(config, image_size=new)
    data.use_preprocessing(preprocessing_for(config.model, config.weights, new))
    built.preprocessing = data.prep
    rt.emit(DefaultsChosen(list(extras["defaults"])))
    return config, True


def run_dataset_report(dataset: Dataset, run_dir: Path) -> dict[str, Any]:
    """The dataset's report for the run folder. Besides ``root`` as the run was given it (relative to the
    working folder of the service's job process, the data folder), ``root_from_run``: the same folder
    relative to the run folder, so the images are found from the run wherever the folders are mounted."""
    report = dataset.report()
    report["root_from_run"] = os.path.relpath(dataset.root, run_dir)
    return report


def split_summary(dataset: Dataset, config: TrainConfig) -> dict[str, Any]:
    """How the run's images are split, for whoever shows it: the source and the counts per class."""
    if dataset.recorded_split:
        source = "recorded"
    elif dataset.explicit_split:
        source = "folders"
    else:
        source = "drawn"
    counts = dataset.counts()
    return {
        "source": source,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "test_fraction": config.test_fraction,
        "counts": counts,
        "totals": {split: sum(c[split] for c in counts.values()) for split in ("train", "val", "test")},
    }


def load_model(config: TrainConfig, num_classes: int) -> BuiltModel:
    torch.manual_seed(config.seed)  # the new head's initialisation depends only on the seed
    return build_model(
        config.model, num_classes, config.weights, image_size=config.image_size, weights_dir=config.weights_dir
    )


# -- one epoch -----------------------------------------------------------------------------------------


@dataclass
class EpochTotals:
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0

    def add(self, loss: float, correct: float, n: int) -> None:
        self.loss_sum += loss * n
        self.correct += correct
        self.seen += n

    def metrics(self) -> dict[str, float]:
        return {"train_loss": self.loss_sum / max(self.seen, 1), "train_acc": self.correct / max(self.seen, 1)}


def train_one_epoch(run: _Run, optim: Optim, augment: TrainAugment, stage: Stage, epoch: int) -> EpochTotals:
    """One pass over the training images in this epoch's seeded order (random crops and flips on the
    device): an optimizer and schedule step per batch, a ``BatchEnd`` event per step."""
    c, dist = run.config, run.rt.dist
    t0 = time.perf_counter()
    run.model.train()
    gen = torch.Generator().manual_seed(seed_for(c.seed, "finetune", epoch))
    order, mine = shard_batches(len(run.data.train_images), c.batch_size, dist.rank, dist.world, generator=gen)
    totals = EpochTotals()
    for b, (x, y) in enumerate(augment.batches(run.data.train_images, order, gen, (dist.rank, dist.world)), 1):
        run.rt.check_stop_together()
        if run.guard is not None and totals.seen > 0 and run.guard.stop_before_batch():
            break  # the budget: this epoch ends here, validated and saved (one device only: see TrainConfig)
        loss, correct = run.train_step(optim, x, y, epoch, global_batch=len(order[b - 1]))
        optim.scheduler.step()
        totals.add(loss, correct, len(y))
        run.progress.batch_end(stage, epoch, b, len(mine), totals, optim.lr, time.perf_counter() - t0)
    if dist.enabled:  # the epoch's figures over every rank's images, the same on every rank
        totals.loss_sum, totals.correct, seen = dist.sum([totals.loss_sum, totals.correct, float(totals.seen)])
        totals.seen = int(seen)
    return totals


def evaluate(
    model: Callable[[torch.Tensor], Any], images: StoredImages, run: _Run
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and labels of ``images`` under the evaluation preprocessing. With
    several ranks each evaluates its share and every rank gets all the logits back."""
    dist = run.rt.dist
    if dist.enabled:
        logits, _ = _evaluate(model, images.subset(dist.shard(len(images))), run)
        if len(logits) == 0:  # fewer images than ranks: this rank's share is empty
            logits = torch.empty(0, run.data.dataset.num_classes)
        return dist.gather_shards(logits, len(images)), images.labels
    return _evaluate(model, images, run)


def _evaluate(
    model: Callable[[torch.Tensor], Any], images: StoredImages, run: _Run
) -> tuple[torch.Tensor, torch.Tensor]:
    return predict_logits(
        model,
        images,
        run.data.prep,
        run.rt.device,
        batch_size=max(64, run.config.batch_size),
        channels_last=run.rt.channels_last,
        autocast=run.rt.autocast,
    )


class TrainStep:
    """One optimizer step on a batch. On CUDA out-of-memory the batch is split into micro-batches with
    gradient accumulation (same effective batch), halving down to ``min_batch_size``; the micro-batch size
    is part of the run's state, so a resumed run keeps it."""

    def __init__(self, model: Callable[[torch.Tensor], Any], config: TrainConfig, rt: Runtime, state: RunState) -> None:
        self.model = model
        self.config = config
        self.rt = rt
        self.state = state

    def __call__(
        self, optim: Optim, x: torch.Tensor, y: torch.Tensor, epoch: int, global_batch: int | None = None
    ) -> tuple[float, int]:
        """(mean loss, correct predictions) of the batch. ``global_batch``: the images of this step across
        every rank (this rank's share is ``x``)."""
        while True:
            try:
                return self._accumulate(optim, x, y, global_batch or len(y))
            except torch.cuda.OutOfMemoryError:
                optim.optimizer.zero_grad(set_to_none=True)
                if self.rt.device.type == "cuda":
                    torch.cuda.empty_cache()
                old = self.state.micro_batch
                new = old // 2
                if new < self.config.min_batch_size or self.rt.dist.enabled:
                    # With several ranks the others are already inside this step's all-reduce: retrying
                    # alone would pair mismatched gradients. The run ends; a smaller batch_size fixes it.
                    raise
                self.rt.emit(OutOfMemoryRetry(epoch, old, new, math.ceil(len(y) / new)))
                self.state.micro_batch = new

    def _accumulate(self, optim: Optim, x: torch.Tensor, y: torch.Tensor, global_batch: int) -> tuple[float, int]:
        smoothing, micro = self.config.label_smoothing or 0.0, self.state.micro_batch
        optim.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        correct = 0
        n = len(y)
        # DDP averages the ranks' gradients: weighting this rank's mean by its share of the global batch
        # (x ranks) makes the result the mean over the global batch even when the shares differ in size.
        share = n * self.rt.dist.world / global_batch
        starts = range(0, n, micro)
        for start in starts:
            xb, yb = x[start : start + micro], y[start : start + micro]
            # Gradients are all-reduced once per step, after the last micro-batch, not after each.
            last = start == starts[-1]
            sync = nullcontext() if last or not isinstance(self.model, DDP) else self.model.no_sync()
            with sync:
                with self.rt.autocast():
                    logits, aux = forward_logits(self.model, xb)  # type: ignore[arg-type]
                    loss = F.cross_entropy(logits, yb, label_smoothing=smoothing)
                    aux_loss = sum(
                        (F.cross_entropy(a, yb, label_smoothing=smoothing) for a in aux),
                        torch.zeros((), device=self.rt.device),
                    )
                optim.scaler.scale((loss + AUX_LOSS_WEIGHT * aux_loss) * (len(yb) / n * share)).backward()
            total_loss += loss.item() * len(yb)  # .item() syncs; it is once per micro-batch
            correct += int((logits.argmax(1) == yb).sum().item())
        optim.scaler.step(optim.optimizer)
        optim.scaler.update()
        return total_loss / n, correct


# -- the run -------------------------------------------------------------------------------------------


class _Progress:
    """What the caller hears while epochs run: a ``BatchEnd`` per step and an ``EpochEnd`` per epoch, with
    throughput and the time left at this stage's average epoch time."""

    def __init__(self, rt: Runtime, total_epochs: int) -> None:
        self.emit = rt.emit
        self.ranks = rt.dist.world  # BatchEnd counts rank 0's images; the ranks step together
        self.total_epochs = total_epochs
        self.start = rt.started  # with the data pass and the model's construction, as the caller waited
        self.epoch_times: dict[str, list[float]] = {"head": [], "finetune": []}

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def batch_end(
        self, stage: Stage, epoch: int, batch: int, num_batches: int, totals: EpochTotals, lr: float, elapsed: float
    ) -> None:
        self.emit(
            BatchEnd(
                epoch,
                self.total_epochs,
                batch,
                num_batches,
                totals.loss_sum / totals.seen,
                totals.correct / totals.seen,
                lr,
                totals.seen * self.ranks / elapsed,
                self.elapsed,
                self.eta(stage, epoch, batch / num_batches, elapsed),
            )
        )

    def epoch_end(self, stage: Stage, entry: dict[str, Any], is_best: bool) -> None:
        epoch, epoch_time = entry["epoch"], entry["epoch_time"]
        self.epoch_times[stage.name].append(epoch_time)
        self.emit(
            EpochEnd(
                epoch,
                self.total_epochs,
                stage.name,
                entry["train_loss"],
                entry["train_acc"],
                entry["val_loss"],
                entry["val_acc"],
                entry["lr"],
                entry["images_per_sec"],
                epoch_time,
                self.elapsed,
                self.eta(stage, epoch, 1.0, epoch_time),
                is_best,
            )
        )

    def eta(self, stage: Stage, epoch: int, fraction: float, elapsed_in_epoch: float) -> float | None:
        """Seconds left: this epoch's remainder plus remaining epochs at this stage's average epoch time."""
        if fraction <= 0:
            return None
        times = self.epoch_times[stage.name]
        per_epoch = (sum(times) / len(times)) if times and fraction >= 1 else elapsed_in_epoch / fraction
        remaining_here = 0.0 if fraction >= 1 else per_epoch * (1 - fraction)
        return remaining_here + per_epoch * (self.total_epochs - epoch)


class _Run:
    """One run: its data, model and state, and the stages it goes through."""

    def __init__(
        self,
        config: TrainConfig,
        rt: Runtime,
        data: RunData,
        built: BuiltModel,
        extras: dict[str, Any] | None = None,
        plan: BudgetPlan | None = None,
    ) -> None:
        self.config = config
        self.rt = rt
        self.data = data
        self.built = built
        self.run_dir = Path(config.out)
        self.model = built.model.to(rt.device)
        if rt.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.stages = plan_stages(config)
        self.state = RunState(BestTracker(config.monitor, config.early_stopping), micro_batch=config.batch_size)
        # The step model shares the model's weights: wrapped for data parallelism (DDP starts every rank
        # from rank 0's weights and all-reduces gradients in backward), compiled at its first call if asked.
        step_model: Any = self.model
        if rt.dist.enabled:
            if config.sync_batchnorm:
                self.model = sync_batchnorm(self.model)
            step_model = DDP(self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        self.train_step = TrainStep(torch.compile(step_model) if config.compile else step_model, config, rt, self.state)
        self.progress = _Progress(rt, self.stages[-1].last_epoch)
        self.info = RunInfo(
            self.run_dir,
            model_meta(config, data.dataset, data.prep, built),
            data.dataset,
            config.monitor,
            extras=extras or {},
            training=training_facts(config, rt),
        )
        self.guard = (
            BudgetGuard(
                rt.started + plan.budget_seconds,
                plan.throughput,
                len(data.val_images),
                len(data.test_images),
                config.batch_size,
            )
            if plan is not None
            else None
        )
        self.resumed_train_state: dict[str, Any] = {}  # optimizer state for a stage resumed half-way

    def restore(self, ckpt: Checkpoint) -> None:
        if ckpt.meta["dataset_fingerprint"] != self.data.dataset.fingerprint:
            raise CheckpointError(
                "the dataset changed since this run started (different files, labels or split); "
                "start a new run instead of resuming"
            )
        saved_devices = int(ckpt.meta.get("config", {}).get("devices", 1))
        if saved_devices != self.config.devices:
            # The order of the images, the global batch and the schedule's steps depend on the rank count.
            raise CheckpointError(
                f"this run was trained on {saved_devices} device(s): resume it with devices={saved_devices}"
            )
        self.model.load_state_dict(ckpt.state_dict())
        self.resumed_train_state = ckpt.train_state()
        self.state.load(ckpt.meta, self.resumed_train_state, self.stages)
        self.rt.set_rng_state(self.resumed_train_state["rng"])

    def execute(self) -> RunResult:
        c, data = self.config, self.data
        if self.rt.dist.is_main:
            self.info.write(self.state, status="running")
        self.rt.emit(
            RunStarted(
                str(self.run_dir),
                c.model,
                c.resolved_strategy(),
                data.dataset.num_classes,
                len(data.train_images),
                len(data.val_images),
                len(data.test_images),
                self.progress.total_epochs,
                str(self.rt.device),
                resumed_from_epoch=self.state.last_epoch,
                split=split_summary(data.dataset, c),
                devices=self.rt.dist.world,
                global_batch=c.batch_size * self.rt.dist.world,
            )
        )
        try:
            for stage in self.stages:
                if stage.name in self.state.finished_stages:
                    continue
                if self.budget_reached():
                    self.state.finish(stage)  # the budget is spent: no stage begins after it
                    continue
                self.run_stage(stage)
        except Cancelled:
            if self.rt.dist.is_main:
                self.info.write(self.state, status="cancelled")
            raise
        except BaseException as e:
            if self.rt.dist.is_main:
                self.info.write(self.state, status="failed", error=f"{type(e).__name__}: {e}")
            raise
        tracker = self.state.tracker
        best = float(tracker.best if tracker.best is not None else float("nan"))
        if not self.rt.dist.is_main:
            # Rank 0 evaluates the best checkpoint and reports; the others are done.
            return RunResult(self.run_dir, tracker.best_epoch, best, c.monitor, {}, self.state.history)
        evaluation = self.final_evaluation()
        self.info.write(self.state, status="succeeded", evaluation=evaluation)
        self.rt.emit(
            RunFinished(str(self.run_dir), tracker.best_epoch, best, c.monitor, evaluation, self.progress.elapsed)
        )
        return RunResult(self.run_dir, tracker.best_epoch, best, c.monitor, evaluation, self.state.history)

    def budget_reached(self) -> bool:
        """Whether the budget leaves no room for another epoch (checked between epochs and stages, once an
        epoch was recorded: a run always trains at least one batch)."""
        return self.guard is not None and bool(self.state.history) and self.guard.stop_before_batch()

    def stop_for_budget(self, stage: Stage) -> None:
        assert self.guard is not None
        if stage.name not in self.state.finished_stages:
            self.state.finish(stage)
        budget = self.guard.deadline - self.rt.started
        self.rt.emit(BudgetReached(self.state.last_epoch, time.perf_counter() - self.rt.started, budget))

    def run_stage(self, stage: Stage) -> None:
        tracker = self.state.tracker
        if self.state.next_epoch <= stage.first_epoch:
            tracker.reset_patience()  # a new stage starts its own count; a resumed one goes on with its own
        if stage.name == "head":
            self.head_stage(stage)
        else:
            self.finetune_stage(stage)
        if tracker.should_stop:
            # Early stopping ends a stage; a next stage still runs, from the weights this one ended with.
            self.rt.emit(EarlyStopped(self.state.last_epoch, tracker.best_epoch, self.config.monitor))

    def head_stage(self, stage: Stage) -> None:
        c, data = self.config, self.data
        self.rt.emit(StageStarted("head", f"training the new head on cached features for {stage.epochs} epochs"))
        features = backbone_features(
            self.model,
            c.model,
            {"train": data.train_images, "val": data.val_images, "test": data.test_images},
            [s.sha256 for s in data.dataset.samples],
            data.prep,
            self.built.transform_input,
            cache_root(c) / "features",
            self.rt,
        )
        labels = {"train": data.train_images.labels, "val": data.val_images.labels}
        head = HeadTrainer(head_module(self.model, c.model), features, labels, c, stage.epochs, self.rt.device)
        best_head: dict[str, torch.Tensor] | None = None
        for epoch in self.state.epochs_to_run(stage):
            if self.budget_reached():
                self.stop_for_budget(stage)
                break
            t0 = time.perf_counter()
            loss_sum, correct, seen = head.train_one_epoch(epoch, self.rt.check_stop)
            train_time = time.perf_counter() - t0
            metrics = {"train_loss": loss_sum / seen, "train_acc": correct / seen, **head.evaluate()}
            if self.end_epoch(stage, epoch, metrics, head.optim.lr, seen, train_time, time.perf_counter() - t0):
                best_head = head.state_dict()
            if self.state.tracker.should_stop:
                break
        self.state.finish(stage)
        self.save_head_stage(head, best_head)

    def save_head_stage(self, head: HeadTrainer, best_head: dict[str, torch.Tensor] | None) -> None:
        """The stage's checkpoints, written once when it ends (saving every epoch would cost more than the
        epochs): the best head, then ``last``, which names it as the best. two-stage goes on from the best
        head, so its ``last`` holds the best head too."""
        last_epoch, best_epoch = self.state.last_epoch, self.state.tracker.best_epoch
        train_state = {"stage": "head", "micro_batch": self.state.micro_batch, "rng": self.rt.rng_state()}
        if best_head is not None and best_epoch != last_epoch:
            final_head = head.state_dict()
            head.head.load_state_dict(best_head)
            self.save(best_epoch, "head", commit=False)
            if self.config.resolved_strategy() != "two-stage":
                head.head.load_state_dict(final_head)
        self.save(last_epoch, "head", train_state=train_state)

    def finetune_stage(self, stage: Stage) -> None:
        c, rt = self.config, self.rt
        n_train, ranks = len(self.data.train_images), rt.dist.world
        if n_train < ranks:
            raise ConfigError([f"{n_train} training images cannot be shared by {ranks} devices"])
        on = f" on {ranks} devices (global batch {c.batch_size * ranks})" if ranks > 1 else ""
        rt.emit(StageStarted("finetune", f"fine-tuning all layers for {stage.epochs} epochs{on}"))
        optim = finetune_optim(
            c,
            self.model,
            discriminative=stage.discriminative,
            steps_per_epoch=len(batches(n_train, c.batch_size * ranks, drop_last=True)),
            epochs=stage.epochs,
            device=rt.device,
            fp16=rt.amp_dtype == torch.float16,
        )
        if self.state.next_epoch > stage.first_epoch:  # resumed half-way through this stage
            optim.load_state_dict(self.resumed_train_state)
        augment = TrainAugment(
            self.data.prep,
            rt.device,
            rt.channels_last,
            scale=(c.crop_scale_min if c.crop_scale_min is not None else 0.25, 1.0),
            hflip=c.hflip is not False,
        )
        for epoch in self.state.epochs_to_run(stage):
            if self.budget_reached():
                self.stop_for_budget(stage)
                break
            t0 = time.perf_counter()
            totals = train_one_epoch(self, optim, augment, stage, epoch)
            train_time = time.perf_counter() - t0
            metrics = {**totals.metrics(), **validation_metrics(*evaluate(self.model, self.data.val_images, self))}
            self.end_epoch(stage, epoch, metrics, optim.lr, totals.seen, train_time, time.perf_counter() - t0)
            cut_short = self.guard is not None and self.guard.reached
            if self.state.stage_done(stage) or cut_short:
                self.state.finish(stage)
            train_state = {
                "stage": "finetune",
                **optim.state_dict(),
                "micro_batch": self.state.micro_batch,
                "rng": rt.rng_state(),
            }
            self.save(epoch, "finetune", train_state=train_state)
            if cut_short:
                self.stop_for_budget(stage)
                break
            if self.state.tracker.should_stop:
                break

    def end_epoch(
        self,
        stage: Stage,
        epoch: int,
        metrics: dict[str, float],
        lr: float,
        seen: float,
        train_time: float,
        epoch_time: float,
    ) -> bool:
        """Record an epoch; returns whether it is the best so far. ``images_per_sec`` is training throughput
        (validation excluded); ``epoch_time`` is the whole epoch."""
        entry: dict[str, Any] = {
            "epoch": epoch,
            "stage": stage.name,
            **metrics,
            "lr": lr,
            "epoch_time": epoch_time,
            "images_per_sec": seen / max(train_time, 1e-9),
        }
        is_best = self.state.record(entry)
        self.progress.epoch_end(stage, entry, is_best)
        return is_best

    def save(self, epoch: int, stage: str, *, train_state: dict[str, Any] | None = None, commit: bool = True) -> None:
        """Rank 0 writes (every rank holds the same weights and state); the others go on to the next epoch
        and meet it at that epoch's first all-reduce."""
        if not self.rt.dist.is_main:
            return
        best_epoch = self.state.tracker.best_epoch
        meta = {**self.info.meta, "epoch": epoch, "stage": stage, **self.state.to_meta(), "saved_at": now()}
        path = save_checkpoint(
            self.run_dir,
            epoch,
            contiguous_state(self.model),
            meta,
            train_state,
            best_epoch=best_epoch,
            commit=commit,
            keep_last=self.config.keep_last,
        )
        self.rt.emit(CheckpointSaved(epoch, str(path), epoch == best_epoch))

    def final_evaluation(self) -> dict[str, Any]:
        best = load_checkpoint(self.run_dir, "best")
        self.model.load_state_dict(best.state_dict())
        model = inference_model(self.model)  # exactly what the predictor will run
        evaluation: dict[str, Any] = {"checkpoint": best.path.name, "epoch": best.epoch}
        outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, images in (("val", self.data.val_images), ("test", self.data.test_images)):
            if len(images) > 0:
                outputs[name] = _evaluate(model, images, self)  # rank 0 alone: the others have finished
                evaluation[name] = metrics_from_logits(*outputs[name], self.data.dataset.classes)
        # Fitted on val, kept with the weights it belongs to: whoever loads the checkpoint applies it.
        calibration, evaluation["calibration"] = calibrate(outputs)
        add_to_meta(best, "calibration", calibration)
        wrong = None
        if "test" in outputs:
            logits, labels = outputs["test"]
            paths = [s.path for s in self.data.dataset.split("test")]
            wrong = misclassified(calibrated(logits, calibration["temperature"]), labels, paths)
            # Where ``path`` is relative to: the dataset's folder as the run was given it, and from the run
            # folder (found wherever the folders are mounted), as in dataset.json.
            wrong.update(
                split="test",
                root=str(self.data.dataset.root),
                root_from_run=os.path.relpath(self.data.dataset.root, self.run_dir),
            )
        self.info.write_report(self.state, evaluation, misclassified=wrong)
        return evaluation


def training_facts(config: TrainConfig, rt: Runtime) -> dict[str, Any]:
    """How the run trains, for run.json: devices, the batch per device and per step, the rate used."""
    return {
        "devices": rt.dist.world,
        "backend": rt.dist.backend,
        "device": str(rt.device) if not rt.dist.enabled else f"{rt.device.type} x {rt.dist.world}",
        "batch_per_device": config.batch_size,
        "global_batch": config.batch_size * rt.dist.world,
        "batchnorm": "synchronised across devices" if rt.dist.enabled and config.sync_batchnorm else "per device",
        "lr": config.resolved_lr(),
        "lr_note": "used as given for the global batch (no automatic scaling with the number of devices)",
    }


def load_run_info(run_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / RUN_FILE)


__all__ = ["RunResult", "default_cache_dir", "load_run_info", "resume", "train", "versions"]
