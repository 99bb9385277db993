"""The head stage: a new classifier trained alone on backbone features.

The backbone is frozen in this stage, so its features are computed once per dataset (evaluation
preprocessing) and cached on disk, keyed by the backbone's weights, the preprocessing and the images.
An epoch is then a few matrix products: milliseconds, even on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .evaluate import predict_logits, validation_metrics
from .events import Progress, StageStarted
from .loader import StoredImages, batches
from .models import Backbone, Preprocessing, main_head_name, state_fingerprint
from .optim import head_optim
from .runtime import Runtime, seed_for

log = logging.getLogger(__name__)


def backbone_features(
    model: nn.Module,
    arch: str,
    splits: dict[str, StoredImages],
    image_hashes: list[str],
    prep: Preprocessing,
    transform_input: bool,
    cache_dir: Path,
    rt: Runtime,
) -> dict[str, torch.Tensor]:
    """Backbone features of every image of each split (eval preprocessing), computed once and cached."""
    from safetensors.torch import load_file, save_file

    backbone = Backbone(model, arch).eval()
    key_src = json.dumps(
        {
            "backbone": state_fingerprint(model, exclude_prefix=main_head_name(arch) + "."),
            "arch": arch,
            "prep": prep.to_dict(),
            "amp": str(rt.amp_dtype),
            "transform_input": transform_input,
            "images": image_hashes,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        try:
            return dict(load_file(str(path)))
        except Exception:  # a damaged cache entry is recomputed, never trusted
            log.warning("feature cache %s is unreadable; recomputing", path)
    rt.emit(StageStarted("features", "computing backbone features once for the frozen head"))
    feats: dict[str, torch.Tensor] = {}
    done = 0
    total = sum(len(v) for v in splits.values())
    for name, images in splits.items():
        if len(images) == 0:
            continue
        parts = []
        for chunk in _chunks(list(range(len(images))), 256):
            rt.check_stop()
            sub = images.subset(chunk)
            logits, _ = predict_logits(
                backbone,
                sub,
                prep,
                rt.device,
                batch_size=64,
                channels_last=rt.channels_last,
                autocast=rt.autocast,
            )
            parts.append(logits)
            done += len(chunk)
            rt.emit(Progress("features", done, total))
        feats[name] = torch.cat(parts).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{time.time_ns()}.tmp")
    save_file(feats, str(tmp))
    tmp.replace(path)
    return feats


class HeadTrainer:
    """Trains ``head`` (the model's own classifier layer, updated in place) on fixed features."""

    def __init__(
        self,
        head: nn.Module,
        features: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
        config: TrainConfig,
        epochs: int,
        device: torch.device,
    ) -> None:
        self.head = head
        self.config = config
        self.x_train, self.y_train = features["train"].to(device), labels["train"].to(device)
        self.x_val, self.y_val = features["val"].to(device), labels["val"].to(device)
        self.optim = head_optim(config, head, math.ceil(len(self.x_train) / config.batch_size), epochs)

    def train_one_epoch(self, epoch: int, check_stop: Callable[[], None]) -> tuple[float, float, int]:
        """One pass over the training features in a seeded order; (loss sum, correct, count)."""
        c = self.config
        self.head.train()
        gen = torch.Generator().manual_seed(seed_for(c.seed, "head", epoch))
        loss_sum = correct = 0.0
        seen = 0
        for idx in batches(len(self.x_train), c.batch_size, generator=gen):
            check_stop()
            xb, yb = self.x_train[idx], self.y_train[idx]
            logits = self.head(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=c.label_smoothing or 0.0)
            self.optim.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optim.optimizer.step()
            self.optim.scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
        return loss_sum, correct, seen

    def evaluate(self) -> dict[str, float]:
        self.head.eval()
        with torch.no_grad():
            return validation_metrics(self.head(self.x_val), self.y_val)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the head's weights (the head itself goes on training)."""
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
