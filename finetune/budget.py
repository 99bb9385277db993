"""``budget_minutes``: a run that ends within its time budget.

Before the first epoch a short probe times a few training steps (forward and backward on augmented
batches of the run's own images, on the run's own device) and an evaluation batch; the epochs that fit the
time left, after what the run already spent and what its final evaluation will take, become the run's
epochs (never more than asked). While training, a guard checks before each batch whether one more batch
would leave too little time to validate, save and evaluate; if so the epoch ends there, is validated and
saved like any other, and the run goes on to its final evaluation. The probe's weights changes are undone.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import predict_logits
from .loader import StoredImages, TrainAugment, batches
from .models import Preprocessing, forward_logits
from .runtime import Runtime, seed_for

PROBE_STEPS = 3
SAFETY = 0.9  # plan for 90 % of the budget: epochs vary, a shared machine is not always as fast
SAVE_SECONDS = 0.5  # a checkpoint write, per epoch (small models; a guess the guard corrects)


@dataclass
class Throughput:
    train_images_per_sec: float
    eval_images_per_sec: float


def probe(
    model: nn.Module, images: StoredImages, val: StoredImages, prep: Preprocessing, batch_size: int, rt: Runtime
) -> Throughput:
    """Images per second of training steps and of evaluation on ``rt.device`` (one warm-up step first)."""
    saved = copy.deepcopy(model.state_dict())
    try:
        return Throughput(
            _train_rate(model, images, prep, batch_size, rt), _eval_rate(model, val, prep, batch_size, rt)
        )
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the clock must not stop before the queued kernels ran


def _train_rate(model: nn.Module, images: StoredImages, prep: Preprocessing, batch_size: int, rt: Runtime) -> float:
    gen = torch.Generator().manual_seed(seed_for(0, "budget_probe"))
    size = min(batch_size, len(images))
    order = batches(len(images), size, generator=gen, drop_last=True)[: PROBE_STEPS + 1]
    augment = TrainAugment(prep, rt.device, rt.channels_last)
    model.train()
    seen, t0 = 0, 0.0
    for k, (x, y) in enumerate(augment.batches(images, order, gen)):
        with rt.autocast():
            logits, _ = forward_logits(model, x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(rt.device)
        if k == 0:
            t0 = time.perf_counter()  # the first step warms caches and kernels up
        else:
            seen += len(y)
    elapsed = time.perf_counter() - t0
    return seen / max(elapsed, 1e-6) if seen else size / max(elapsed, 1e-6)


def _eval_rate(model: nn.Module, val: StoredImages, prep: Preprocessing, batch_size: int, rt: Runtime) -> float:
    n = min(len(val), max(64, batch_size) * 2)
    subset = val.subset(range(n))
    bs = max(64, batch_size)
    warm = subset.subset(range(min(n, 8)))
    predict_logits(model, warm, prep, rt.device, batch_size=bs, channels_last=rt.channels_last, autocast=rt.autocast)
    t0 = time.perf_counter()
    predict_logits(model, subset, prep, rt.device, batch_size=bs, channels_last=rt.channels_last, autocast=rt.autocast)
    _sync(rt.device)
    return n / max(time.perf_counter() - t0, 1e-6)


MIN_BUDGET_EPOCHS = 5  # fewer fit at the image size chosen for the run: a smaller size is tried


@dataclass
class BudgetPlan:
    budget_seconds: float
    epochs: int
    throughput: Throughput
    estimated_seconds: float
    reason: str
    fit: int = 0  # epochs that fit the budget (before the cap at the epochs asked for)
    per_epoch: float = 0.0
    available: float = 0.0  # seconds for the epochs


def smaller_size(size: int, smallest: int, plan: BudgetPlan, want: int) -> int | None:
    """The largest image size (a multiple of 8, at least ``smallest``) at which ``want`` epochs fit the plan's
    time, with an epoch's time scaled by the pixel count; None when ``size`` fits already or nothing smaller
    is allowed. At the smallest size it is the smallest: fewer epochs then, the guard cuts the rest."""
    if plan.fit >= want or size <= smallest or plan.per_epoch <= 0:
        return None
    for candidate in range(8 * (size // 8) - 8, smallest - 1, -8):
        if max(candidate, smallest) == smallest or plan.per_epoch * (candidate / size) ** 2 * want <= plan.available:
            return max(candidate, smallest)
    return smallest


def plan_epochs(
    budget_seconds: float,
    elapsed: float,
    tp: Throughput,
    train_images: int,
    val_images: int,
    test_images: int,
    max_epochs: int,
) -> BudgetPlan:
    """As many epochs as fit ``SAFETY`` of the budget after ``elapsed`` and the final evaluation (at least 1:
    the guard then cuts that epoch short)."""
    per_epoch = train_images / tp.train_images_per_sec + val_images / tp.eval_images_per_sec + SAVE_SECONDS
    final = (val_images + test_images) / tp.eval_images_per_sec
    available = budget_seconds * SAFETY - elapsed - final
    fit = math.floor(available / per_epoch) if available > 0 else 0
    epochs = max(1, min(max_epochs, fit))
    estimate = elapsed + final + epochs * per_epoch if fit >= 1 else budget_seconds
    if fit >= max_epochs:
        reason = f"{max_epochs} epochs as asked: they fit the budget ({per_epoch:.1f} s an epoch)"
    elif fit >= 1:
        reason = f"{epochs} epochs of {per_epoch:.1f} s fit the budget of {budget_seconds / 60:g} min"
    else:
        reason = f"not even one epoch of {per_epoch:.1f} s fits the budget: the epoch is cut short"
    return BudgetPlan(budget_seconds, epochs, tp, min(estimate, budget_seconds), reason, fit, per_epoch, available)


class BudgetGuard:
    """Whether one more training batch still leaves time to validate, save and evaluate."""

    def __init__(self, deadline: float, tp: Throughput, val_images: int, test_images: int, batch_size: int) -> None:
        self.deadline = deadline
        eval_rate = tp.eval_images_per_sec
        # validation of this epoch + final evaluation (val and test) + a save, with a margin
        self.reserve = (2 * val_images + test_images) / eval_rate + SAVE_SECONDS
        self.batch_seconds = batch_size / tp.train_images_per_sec
        self.reached = False

    def stop_before_batch(self) -> bool:
        if time.perf_counter() + self.batch_seconds + self.reserve > self.deadline:
            self.reached = True
        return self.reached
