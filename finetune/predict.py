"""Prediction with a trained run: ``Predictor.from_run(RUN_DIR).predict(images, top_k)``.

Preprocessing is exactly the evaluation's (``finetune.preprocess``): the pixels the store would keep for
the file, then the same resize, centre crop and normalisation from the checkpoint's metadata, so a model
scores an image the same way in ``finetune eval``, in the service and here. Loading happens once;
``predict`` takes batches.

Probabilities are calibrated: ``softmax(logits / T)`` with the temperature fitted after training
(``finetune.calibration``, kept in the checkpoint's ``calibration``; 1 for checkpoints without it).
``answer`` turns them into a label, or ``UNKNOWN`` when the top probability is below the threshold.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_checkpoint
from .errors import ConfigError
from .explain import GradCam
from .images import DEFAULT_MAX_PIXELS
from .loader import Normalizer
from .models import Preprocessing, build_for_checkpoint, inference_model
from .preprocess import eval_crop, stored_pixels

ImageInput = Image.Image | bytes | str | Path
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "index": self.index, "probability": self.probability}


class Predictor:
    """A loaded model ready to classify images. Thread-safe: forward passes are serialised."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device) -> None:
        self.meta = meta
        self.arch: str = meta["arch"]
        self.classes: list[str] = list(meta["class_names"])
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.device = device
        self.channels_last = True
        self.model = inference_model(model).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.normalize = Normalizer(self.preprocessing, device, self.channels_last)
        self.amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        self.max_pixels = DEFAULT_MAX_PIXELS
        calibration = meta.get("calibration") or {}
        self.temperature = float(calibration.get("temperature") or 1.0)
        chosen = calibration.get("threshold")
        # The threshold chosen on validation (None: none was, every image gets its top label).
        self.threshold: float | None = float(chosen) if chosen is not None else None
        self._lock = threading.Lock()
        self.checkpoint_path: Path | None = None  # where the weights came from (for the eager explainer)
        self._explainer: GradCam | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best", device: str = "auto") -> Predictor:
        """Load the ``best`` (or ``last``) checkpoint of a run directory, or a checkpoint folder."""
        ckpt = load_checkpoint(run_dir, checkpoint)
        meta = ckpt.meta
        model = build_for_checkpoint(meta["arch"], int(meta["num_classes"]), bool(meta.get("transform_input")))
        model.load_state_dict(ckpt.state_dict())
        if device == "auto":
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(device)
        predictor = cls(model, meta, dev)
        predictor.checkpoint_path = ckpt.path
        return predictor

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """Decode (bytes, path or PIL image) and crop: a (crop, crop, 3) uint8 array.

        Raises ``ImageError`` for anything that is not an acceptable image."""
        prep = self.preprocessing
        # PIL images too: EXIF orientation, modes and JPEG scale exactly as for their bytes.
        stored, _ = stored_pixels(image, prep.tier, max_pixels=self.max_pixels)
        return eval_crop(stored, prep)

    def explainer(self) -> GradCam:
        """Grad-CAM on the eager network, built from the checkpoint at the first explanation (the served
        network has its batch norms folded away and may be an export)."""
        with self._lock:
            if self._explainer is None:
                if self.checkpoint_path is None:
                    raise ConfigError(["this predictor was not loaded from a checkpoint: it cannot explain"])
                ckpt = load_checkpoint(self.checkpoint_path)
                model = build_for_checkpoint(self.arch, len(self.classes), bool(self.meta.get("transform_input")))
                model.load_state_dict(ckpt.state_dict())
                normalize = Normalizer(self.preprocessing, self.device, channels_last=False)
                self._explainer = GradCam(model.to(self.device), self.arch, self.preprocessing, normalize)
            return self._explainer

    def explain(self, image: ImageInput, class_index: int | None = None) -> tuple[np.ndarray, int]:
        """Grad-CAM heat map of ``image`` for ``class_index`` (default: the top class), float32 (height,
        width) in [0, 1] at the input image's own size, and the class it explains."""
        stored, original = stored_pixels(image, self.preprocessing.tier, max_pixels=self.max_pixels)
        explainer = self.explainer()
        heat, index = explainer.crop_heatmap(eval_crop(stored, self.preprocessing), class_index)
        return explainer.image_heatmap(heat, original), index

    def autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.inference_mode()
    def probabilities(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Class probabilities (N x C, float32, CPU) for preprocessed arrays, in one forward pass."""
        x = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)
        with self._lock:
            x = self.normalize(x)
            with self.autocast():
                logits = self.model(x)
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu()

    def answer(self, probs: torch.Tensor, threshold: float | None = None) -> list[str]:
        """Per image, the top label, or ``UNKNOWN`` when its probability is below ``threshold`` (the
        given one, else the model's own; no threshold: always the top label)."""
        limit = self.threshold if threshold is None else threshold
        values, indices = probs.max(1)
        return [
            UNKNOWN if limit is not None and v < limit else self.classes[int(i)]
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def top_k(self, probs: torch.Tensor, k: int) -> list[list[Prediction]]:
        k = max(1, min(k, len(self.classes)))
        values, indices = probs.topk(k, dim=1)
        return [
            [Prediction(self.classes[int(i)], int(i), float(v)) for v, i in zip(vs, ids, strict=True)]
            for vs, ids in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def predict(self, images: Sequence[ImageInput], top_k: int = 5, batch_size: int = 32) -> list[list[Prediction]]:
        """Top-k labels with probabilities for each image (all probabilities of an image sum to 1)."""
        if top_k < 1:
            raise ConfigError([f"top_k must be at least 1, got {top_k}"])
        out: list[list[Prediction]] = []
        for start in range(0, len(images), batch_size):
            arrays = [self.preprocess(img) for img in images[start : start + batch_size]]
            out.extend(self.top_k(self.probabilities(arrays), top_k))
        return out
