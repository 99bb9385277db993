"""``lr: auto``: a learning-rate range test before the run, in the manner of fastai's ``lr_find``.

The rate grows exponentially from ``START`` to ``END`` over at most ``STEPS`` training batches (the run's
own augmentation, optimizer and parameter groups, every group scaled alike) while the loss is smoothed
with an exponential moving average (debiased, beta 0.98, as fastai does); the test stops once the
smoothed loss exceeds four times its minimum. The rate chosen is fastai's ``lr_min``: the rate at the
smoothed loss's minimum divided by ten, the last rate at which the loss still fell steadily (at the
minimum itself the loss is about to diverge). Steepest descent, the other common pick, follows the noise
of a short curve more than this does. The model's weights, and its normalisation statistics, are restored
afterwards: the test leaves no trace but its curve.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .loader import StoredImages, TrainAugment, batches
from .models import Preprocessing, forward_logits, parameter_groups
from .optim import decay_groups, layer_rates, make_optimizer
from .runtime import Runtime, seed_for

START = 1e-7
END = 10.0
STEPS = 100
BETA = 0.98
DIVERGED = 4.0
METHOD = "lr_min: the rate at the smoothed loss's minimum / 10"


@dataclass
class LrCurve:
    lr: float
    method: str
    lrs: list[float]
    losses: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "method": self.method, "lrs": self.lrs, "losses": self.losses}


def find_lr(
    model: nn.Module,
    config: TrainConfig,
    images: StoredImages,
    prep: Preprocessing,
    rt: Runtime,
    *,
    start: float = START,
    end: float = END,
    steps: int = STEPS,
) -> LrCurve:
    """Run the range test on ``images`` (the training split) and return its curve and chosen rate."""
    saved = copy.deepcopy(model.state_dict())
    try:
        lrs, losses = _range_test(model, config, images, prep, rt, start, end, steps)
    finally:
        model.load_state_dict(saved)
    return LrCurve(choose_lr(lrs, losses, start, end), METHOD, lrs, losses)


def choose_lr(lrs: list[float], losses: list[float], start: float = START, end: float = END) -> float:
    """fastai's ``lr_min``: the rate at the lowest smoothed loss, divided by 10, kept inside the range."""
    finite = [(loss, lr) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    if not finite:
        return start
    _, at_min = min(finite)
    return min(max(at_min / 10, start), end)


def _range_test(
    model: nn.Module,
    config: TrainConfig,
    images: StoredImages,
    prep: Preprocessing,
    rt: Runtime,
    start: float,
    end: float,
    steps: int,
) -> tuple[list[float], list[float]]:
    c = replace(config, lr=1.0)  # group rates relative to the head's (backbone multiplier included)
    groups = parameter_groups(model, c.model)
    mults = layer_rates(c, len(groups), discriminative=False)
    optimizer = make_optimizer(c, decay_groups(groups, mults, c.weight_decay))
    for g in optimizer.param_groups:
        g["mult"] = g["lr"]
    augment = TrainAugment(
        prep,
        rt.device,
        rt.channels_last,
        scale=(c.crop_scale_min if c.crop_scale_min is not None else 0.25, 1.0),
        hflip=bool(c.hflip),
    )
    gen = torch.Generator().manual_seed(seed_for(c.seed, "lr_find"))
    batch_size = min(c.batch_size, len(images))
    per_pass = batches(len(images), batch_size, generator=gen, drop_last=True)
    order = (per_pass * math.ceil(steps / max(len(per_pass), 1)))[:steps]
    ratio = (end / start) ** (1 / max(len(order) - 1, 1))
    smoothing = c.label_smoothing or 0.0
    model.train()
    lrs: list[float] = []
    losses: list[float] = []
    avg, best = 0.0, math.inf
    for k, (x, y) in enumerate(augment.batches(images, order, gen)):
        rt.check_stop()
        lr = start * ratio**k
        for g in optimizer.param_groups:
            g["lr"] = g["mult"] * lr
        optimizer.zero_grad(set_to_none=True)
        with rt.autocast():
            logits, _ = forward_logits(model, x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        loss.backward()
        optimizer.step()
        value = float(loss.item())
        avg = BETA * avg + (1 - BETA) * value
        smooth = avg / (1 - BETA ** (k + 1))
        lrs.append(lr)
        losses.append(smooth)
        if not math.isfinite(smooth) or (k > 0 and smooth > DIVERGED * best):
            break
        best = min(best, smooth)
    return lrs, losses
