"""Run directories made without training: a randomly initialised network of any architecture saved as a
checkpoint, with a ``dataset.json`` whose test and val splits are tiny generated images on disk. Enough for
export, parity and serving tests, which need a run's files, not a trained model."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from finetune.checkpoint import FORMAT_VERSION, atomic_write_json, contiguous_state, save_checkpoint
from finetune.models import MIN_IMAGE_SIZE, build_model

from .helpers import CLASSES, shape_image

# The smallest crop each architecture takes (AlexNet needs 64 px; the others are fine at 32).
SMALL_CROP = {arch: max(32, MIN_IMAGE_SIZE.get(arch, 32)) for arch in ("alexnet", "googlenet", "lenet")}


def make_run(root: Path, arch: str, *, per_split: int = 6, seed: int = 0, image_px: int = 48) -> Path:
    """``root`` as the run directory of a random ``arch`` over the three shape classes."""
    classes = list(CLASSES)
    crop = SMALL_CROP.get(arch, 32)
    torch.manual_seed(seed)
    built = build_model(arch, len(classes), "none", image_size=crop)
    data = root / "data"
    rng = random.Random(seed)
    files = []
    for split in ("train", "val", "test"):
        for i in range(per_split):
            name = classes[i % len(classes)]
            rel = f"{name}/{split}-{i:03d}.png"
            (data / name).mkdir(parents=True, exist_ok=True)
            shape_image(name, rng, size=image_px).save(data / rel)
            files.append({"path": rel, "class": name, "split": split})
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "dataset.json", {"root": str(data), "classes": classes, "files": files})
    meta = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": len(classes),
        "class_names": classes,
        "preprocessing": built.preprocessing.to_dict(),
        "transform_input": built.transform_input,
        "epoch": 1,
    }
    save_checkpoint(root, 1, contiguous_state(built.model), meta, None, best_epoch=1)
    return root
