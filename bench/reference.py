"""The reference arms: a faithful reimplementation of the official PyTorch tutorial
"Transfer Learning for Computer Vision" (pytorch.org/tutorials/beginner/transfer_learning_tutorial.html).

ImageFolder + PIL transforms + DataLoader(batch_size=4, shuffle=True, num_workers=4), SGD(lr=1e-3,
momentum=0.9), StepLR(step_size=7, gamma=0.1), fp32, a validation pass every epoch, the best weights kept.
``fixed_feature_extractor=True`` is the tutorial's second half: every parameter frozen except the new
``fc``, optimised alone — the loop (and the per-epoch forward passes over all images) stays the same.

The only changes: the crop size is a parameter (the tutorial uses 224, resize 256; we scale both), the
architecture may be AlexNet/GoogLeNet, and initial weights come from a file so both arms start equal.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn, optim
from torch.optim import lr_scheduler
from torchvision import datasets, models, transforms

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


@dataclass
class ReferenceResult:
    epochs: list[dict[str, float]] = field(default_factory=list)  # per epoch: elapsed, val_acc, train images/s
    best_acc: float = 0.0
    wall: float = 0.0
    train_images_per_sec: float = 0.0


def tutorial_transforms(crop: int) -> dict[str, transforms.Compose]:
    resize = round(crop * 256 / 224)
    return {
        "train": transforms.Compose(
            [
                transforms.RandomResizedCrop(crop),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        ),
        "val": transforms.Compose(
            [
                transforms.Resize(resize),
                transforms.CenterCrop(crop),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        ),
    }


def build_reference_model(arch: str, num_classes: int, init: Path | None) -> nn.Module:
    """torchvision's model with the tutorial's head swap (``fc`` / ``classifier[6]``)."""
    if arch == "googlenet":
        model = models.googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=False)
    else:
        model = getattr(models, arch)(weights=None)
    if init is not None:
        from finetune.weights import load_state_file

        state = {k: v for k, v in load_state_file(init).items() if not k.startswith(("fc.", "classifier.6.", "aux"))}
        model.load_state_dict(state, strict=False)
    if arch == "alexnet":
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    else:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def head_of(model: nn.Module, arch: str) -> nn.Module:
    return model.classifier[6] if arch == "alexnet" else model.fc  # type: ignore[index, return-value]


def run_tutorial(
    data_dir: Path,
    arch: str,
    *,
    epochs: int,
    crop: int,
    init: Path | None,
    seed: int = 0,
    fixed_feature_extractor: bool = False,
    num_workers: int = 4,
    batch_size: int = 4,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> ReferenceResult:
    torch.manual_seed(seed)
    tfs = tutorial_transforms(crop)
    image_datasets = {x: datasets.ImageFolder(str(data_dir / x), tfs[x]) for x in ("train", "val")}
    dataloaders = {
        x: torch.utils.data.DataLoader(image_datasets[x], batch_size=batch_size, shuffle=True, num_workers=num_workers)
        for x in ("train", "val")
    }
    sizes = {x: len(image_datasets[x]) for x in ("train", "val")}
    model = build_reference_model(arch, len(image_datasets["train"].classes), init)
    if fixed_feature_extractor:
        for p in model.parameters():
            p.requires_grad = False
        head = head_of(model, arch)
        for p in head.parameters():
            p.requires_grad = True
        optimizer = optim.SGD(head.parameters(), lr=0.001, momentum=0.9)
    else:
        optimizer = optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)

    result = ReferenceResult()
    best_wts = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    train_time = 0.0
    for _epoch in range(epochs):
        for phase in ("train", "val"):
            t0 = time.perf_counter()
            model.train() if phase == "train" else model.eval()
            running_corrects = 0
            for inputs, labels in dataloaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                running_corrects += int(torch.sum(preds == labels.data))
            if phase == "train":
                scheduler.step()
                train_time += time.perf_counter() - t0
            else:
                acc = running_corrects / sizes["val"]
                record = {"elapsed": time.perf_counter() - start, "val_acc": acc}
                result.epochs.append(record)
                if on_epoch:
                    on_epoch(record)
                if acc > result.best_acc:
                    result.best_acc = acc
                    best_wts = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_wts)
    result.wall = time.perf_counter() - start
    result.train_images_per_sec = sizes["train"] * epochs / max(train_time, 1e-9)
    return result
