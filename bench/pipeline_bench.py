"""Data pipeline per epoch: the decode-once cache + batched tensor augmentation against PIL decoding and
torchvision transforms in a DataLoader (the tutorial's configuration, and one tuned for this machine).

Only the input pipeline is timed (no model): images/s to produce normalised, augmented training batches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ratio, stats
from bench.reference import tutorial_transforms


def ours_epoch(data_dir: Path, crop: int, cache_root: Path, batch_size: int = 32) -> tuple[float, float]:
    """(first epoch images/s including the one-time decode into the pixel store, later epoch images/s)."""
    from finetune.datastore import load_into_store
    from finetune.loader import TrainAugment, batches
    from finetune.models import preprocessing_for

    prep = preprocessing_for("resnet18", "none", crop)
    t0 = time.perf_counter()
    stored = load_into_store(data_dir, cache_root=cache_root, tier=prep.tier)
    images = stored.splits["train"]
    augment = TrainAugment(prep, torch.device("cpu"), channels_last=True, scale=(0.08, 1.0))

    def one_epoch(seed: int) -> int:
        gen = torch.Generator().manual_seed(seed)
        n = 0
        for x, _ in augment.batches(images, batches(len(images), batch_size, generator=gen), gen):
            n += x.shape[0]
        return n

    n = one_epoch(0)
    first = n / (time.perf_counter() - t0)
    t1 = time.perf_counter()
    n = one_epoch(1)
    later = n / (time.perf_counter() - t1)
    stored.close()
    return first, later


def reference_epoch(data_dir: Path, crop: int, *, batch_size: int, num_workers: int) -> float:
    from torchvision import datasets

    ds = datasets.ImageFolder(str(data_dir / "train"), tutorial_transforms(crop)["train"])
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, persistent_workers=False
    )
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def pipeline(data_dir: Path, *, crop: int, repeats: int, log: Any) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    ours_first, ours_later, tutorial, tuned = [], [], [], []
    for i in range(repeats):
        cache_root = Path(tempfile.mkdtemp(prefix="bench-pipe-"))
        try:
            arms = ["ours", "tutorial", "tuned"] if i % 2 == 0 else ["tuned", "tutorial", "ours"]
            for arm in arms:
                if arm == "ours":
                    first, later = ours_epoch(data_dir, crop, cache_root)
                    ours_first.append(first)
                    ours_later.append(later)
                elif arm == "tutorial":
                    tutorial.append(reference_epoch(data_dir, crop, batch_size=4, num_workers=4))
                else:
                    tuned.append(reference_epoch(data_dir, crop, batch_size=32, num_workers=cores))
        finally:
            shutil.rmtree(cache_root, ignore_errors=True)
        log(
            f"  pipeline repeat {i + 1}: ours {ours_later[-1]:.0f} img/s (first epoch {ours_first[-1]:.0f}), "
            f"DataLoader tutorial {tutorial[-1]:.0f}, tuned {tuned[-1]:.0f}"
        )
    out: dict[str, Any] = {
        "title": f"data pipeline per epoch, {crop}px crops",
        "ours": {"images_per_sec": stats(ours_later), "first_epoch_images_per_sec": stats(ours_first)},
        "reference": {"tutorial_images_per_sec": stats(tutorial), "tuned_images_per_sec": stats(tuned)},
    }
    tutorial_ips = out["reference"]["tutorial_images_per_sec"]["median"]
    tuned_ips = out["reference"]["tuned_images_per_sec"]["median"]
    out["ratios"] = {
        # The reference arm is the tutorial's loader; the tuned loader is reported beside it for honesty.
        "images_per_sec": ratio(out["ours"]["images_per_sec"]["median"], tutorial_ips),
        "vs_tuned_loader": ratio(out["ours"]["images_per_sec"]["median"], tuned_ips),
        "first_epoch_vs_tutorial_loader": ratio(out["ours"]["first_epoch_images_per_sec"]["median"], tutorial_ips),
    }
    out["targets"] = {
        "images_per_sec": {
            "goal": ">= 5x (against the tutorial's DataLoader)",
            "met": out["ratios"]["images_per_sec"] >= 5,
        },
        "vs_tuned_loader": {
            "goal": ">= 5x (against a DataLoader tuned for this machine)",
            "met": out["ratios"]["vs_tuned_loader"] >= 5,
        },
    }
    return out
