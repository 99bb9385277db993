"""Optimizers and learning-rate schedules: which parameters learn at which rate, with which decay.

``Optim`` keeps an optimizer with its per-step schedule and its gradient scaler: built together, stepped
together, saved into a checkpoint and restored from one together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .models import parameter_groups


@dataclass
class Optim:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    @property
    def lr(self) -> float:
        """The head's rate (the last parameter group), the one reported per batch and epoch."""
        return float(self.optimizer.param_groups[-1]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def head_optim(config: TrainConfig, head: nn.Module, steps_per_epoch: int, epochs: int) -> Optim:
    """A new head alone on fixed features, at the head rate (see ``TrainConfig.resolved_head_lr``)."""
    groups = decay_groups([list(head.parameters())], [config.resolved_head_lr()], config.weight_decay)
    optimizer = make_optimizer(config, groups)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch, epochs)
    return Optim(optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))


def finetune_optim(
    config: TrainConfig,
    model: nn.Module,
    *,
    discriminative: bool,
    steps_per_epoch: int,
    epochs: int,
    device: torch.device,
    fp16: bool,
) -> Optim:
    """All layers, each parameter group at its rate (``layer_rates``). fp16 scales its gradients."""
    groups = parameter_groups(model, config.model)
    lrs = layer_rates(config, len(groups), discriminative=discriminative)
    optimizer = make_optimizer(config, decay_groups(groups, lrs, config.weight_decay))
    scheduler = make_scheduler(config, optimizer, steps_per_epoch, epochs)
    return Optim(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=fp16))


def layer_rates(config: TrainConfig, n_groups: int, *, discriminative: bool) -> list[float]:
    """The rate of each parameter group, input first, head last."""
    lr = config.resolved_lr()
    if discriminative:
        # fastai's fine_tune: after the head stage, halve the rate and spread it geometrically from
        # base/100 at the input to base at the head.
        base = lr / 2
        return [base / 100 * (100 ** (i / (n_groups - 1))) for i in range(n_groups)]
    mult = config.resolved_backbone_lr_mult()
    return [lr * mult] * (n_groups - 1) + [lr]


def decay_groups(groups: list[list[nn.Parameter]], lrs: list[float], weight_decay: float) -> list[dict[str, Any]]:
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


def make_optimizer(c: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=groups[-1]["lr"], momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0)
    if c.optimizer == "adam":
        return torch.optim.Adam(groups, lr=groups[-1]["lr"])
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=groups[-1]["lr"])
    return torch.optim.RMSprop(groups, lr=groups[-1]["lr"], momentum=c.momentum, alpha=0.9, eps=1e-3)


def make_scheduler(
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
