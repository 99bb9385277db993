"""The TorchServe handler of the benchmark: what a TorchServe user writes for an image classifier.

It runs inside TorchServe's Python worker (not in our environment's imports): the torchvision network of the
run's architecture with the run's weights (``weights.pt``, a plain state dict), eval mode, float32, and the
usual torchvision transforms (resize, centre crop, to tensor, normalise) from the run's ``meta.json``. Every
image of a TorchServe batch is decoded with PIL and the batch goes through one forward pass.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import torch
from PIL import Image
from torchvision import models, transforms


class ImageClassifier:
    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties.get("model_dir")
        with open(os.path.join(model_dir, "meta.json")) as f:
            meta = json.load(f)
        prep = meta["preprocessing"]
        model = getattr(models, meta["arch"])(weights=None, num_classes=meta["num_classes"], **_extra(meta["arch"]))
        state = torch.load(os.path.join(model_dir, "weights.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=False)  # GoogLeNet's auxiliary heads are not used in eval mode
        self.model = model.eval()
        self.classes = meta["class_names"]
        self.transform = transforms.Compose(
            [
                transforms.Resize(prep["resize_size"]),
                transforms.CenterCrop(prep["crop_size"]),
                transforms.ToTensor(),
                transforms.Normalize(prep["mean"], prep["std"]),
            ]
        )
        self.initialized = True

    def handle(self, data: list[dict[str, Any]]) -> list[Any]:
        images = []
        for row in data:
            body = row.get("data") or row.get("body") or b""
            images.append(self.transform(Image.open(io.BytesIO(body)).convert("RGB")))
        with torch.inference_mode():
            probs = torch.softmax(self.model(torch.stack(images)), dim=1)
        top = probs.topk(min(5, len(self.classes)), dim=1)
        return [
            [{"label": self.classes[int(i)], "probability": float(p)} for p, i in zip(ps, ids, strict=True)]
            for ps, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]


def _extra(arch: str) -> dict[str, Any]:
    return {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}


_service = ImageClassifier()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data)
