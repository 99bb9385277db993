"""Evaluation: loss, top-1, top-5, per-class precision/recall/F1 and the confusion matrix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .loader import Normalizer, StoredImages, batches, prefetch
from .models import Preprocessing


def validation_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The two figures reported after every epoch (and monitored for the best epoch and early stopping)."""
    return {
        "val_loss": F.cross_entropy(logits, labels).item(),
        "val_acc": (logits.argmax(1) == labels).float().mean().item(),
    }


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Every evaluation figure from a split's logits (float, N x C) and labels (N)."""
    n, c = logits.shape
    if n == 0:
        return {"count": 0}
    logits = logits.float()
    loss = F.cross_entropy(logits, labels).item()
    pred = logits.argmax(1)
    top1 = (pred == labels).float().mean().item()
    result: dict[str, Any] = {"count": n, "loss": loss, "top1": top1}
    if c >= 5:
        top5 = logits.topk(5, dim=1).indices.eq(labels.unsqueeze(1)).any(1).float().mean().item()
        result["top5"] = top5
    confusion = torch.zeros(c, c, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    tp = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp)
    )
    result["per_class"] = [
        {
            "class": name,
            "precision": precision[i].item(),
            "recall": recall[i].item(),
            "f1": f1[i].item(),
            "support": int(actual[i].item()),
        }
        for i, name in enumerate(class_names)
    ]
    present = actual > 0
    result["macro_f1"] = f1[present].mean().item() if present.any() else 0.0
    result["confusion_matrix"] = confusion.tolist()
    return result


MAX_MISCLASSIFIED = 10_000  # kept in report.json; a larger test split records how many more there were


def misclassified(
    probs: torch.Tensor, labels: torch.Tensor, paths: Sequence[str], limit: int = MAX_MISCLASSIFIED
) -> dict[str, Any]:
    """The images a model got wrong, compactly: each with its dataset-relative ``path``, ``true`` and
    ``predicted`` class index and the predicted class's ``probability``, in the split's order."""
    confidence, predicted = probs.max(1)
    wrong = (predicted != labels).nonzero().flatten().tolist()
    items = [
        {
            "path": paths[i],
            "true": int(labels[i]),
            "predicted": int(predicted[i]),
            "probability": round(float(confidence[i]), 6),
        }
        for i in wrong[:limit]
    ]
    return {"count": len(labels), "total": len(wrong), "items": items}


@torch.inference_mode()
def predict_logits(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: StoredImages,
    prep: Preprocessing,
    device: torch.device,
    *,
    batch_size: int = 64,
    channels_last: bool = True,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and labels for ``images`` under the evaluation preprocessing."""
    if isinstance(model, nn.Module):
        model.eval()
    normalize = Normalizer(prep, device, channels_last)
    outs: list[torch.Tensor] = []
    order = batches(len(images), batch_size)
    reused: torch.Tensor | None = None  # on the CPU, one float batch filled again each time (no page faults)
    for batch in prefetch(images.center_crops(idx, prep) for idx in order):
        if device.type == "cpu":
            if reused is None or reused.shape[0] < len(batch.pixels):
                b, h, w, _ = batch.pixels.shape
                reused = torch.empty((b, 3, h, w)).contiguous(memory_format=normalize.memory_format)
            x = normalize.normalize_(reused[: len(batch.pixels)].copy_(batch.pixels.permute(0, 3, 1, 2)))
        else:
            x = normalize(batch.pixels.to(device, non_blocking=True))
        with autocast():
            out = model(x)
        outs.append(out.float().cpu())
    logits = torch.cat(outs) if outs else torch.empty(0, 0)
    return logits, images.labels


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    cache_max_bytes: int | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run on every image of a class-folder dataset (folder or zip).

    Folder classes must be classes of the model; the report is in the model's class order.
    """
    from .dataset import DatasetOptions
    from .datastore import load_into_store
    from .errors import DatasetError
    from .predict import Predictor

    predictor = Predictor.from_run(run_dir, checkpoint, device)
    cache_root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "finetune"
    prep = predictor.preprocessing
    with load_into_store(
        data,
        cache_root=cache_root,
        tier=prep.tier,
        options=DatasetOptions(evaluate_only=True),
        extract_dir=cache_root / "extracted",
        max_bytes=cache_max_bytes,
    ) as stored:
        dataset = stored.dataset
        unknown = [c for c in dataset.classes if c not in predictor.classes]
        if unknown:
            raise DatasetError(
                f"classes {unknown} are not classes of this model; it knows: {', '.join(predictor.classes)}"
            )
        remap = torch.tensor([predictor.classes.index(c) for c in dataset.classes], dtype=torch.int64)
        images = stored.splits["test"]
        images = StoredImages(images.store, images.entries, remap[images.labels])
        logits, labels = predict_logits(
            predictor.model,
            images,
            prep,
            predictor.device,
            batch_size=batch_size,
            channels_last=predictor.channels_last,
            autocast=predictor.autocast,
        )
    result = metrics_from_logits(logits, labels, predictor.classes)
    return {
        "run": str(run_dir),
        "checkpoint": checkpoint,
        "data": str(data),
        "skipped": len(dataset.skipped),
        "metrics": result,
    }
