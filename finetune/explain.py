"""Grad-CAM explanations: where in the image the network looked for its answer.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of the last convolutional block's output by the mean
gradient of the class score over that channel, sums, keeps the positive part and scales it to [0, 1]. It
runs on the eager PyTorch network (the one the checkpoint describes, not the batch-norm-folded or exported
one: those have no modules to hook) with a forward hook that keeps the block's output and its gradient.

The heat map is computed on the centre crop the model sees and placed back on the whole input image, so it
has the input's size; what lies outside the crop was not seen and stays 0.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .models import Preprocessing

# The module whose output Grad-CAM reads, per architecture: the last convolutional block, after its
# activation and before the global pooling. (LeNet's last pooling, since its ReLU works in place.)
TARGET_LAYERS = {
    "lenet": "features.5",
    "alexnet": "features",
    "googlenet": "inception5b",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "resnet101": "layer4",
    "resnet152": "layer4",
}


def target_layer(model: nn.Module, arch: str) -> nn.Module:
    return model.get_submodule(TARGET_LAYERS[arch])


class GradCam:
    """Grad-CAM for one eager network. Thread-safe: explanations are serialised (the hook keeps state)."""

    def __init__(self, model: nn.Module, arch: str, prep: Preprocessing, normalize: Any) -> None:
        self.model = model.eval()
        for param in self.model.parameters():  # gradients flow to the hooked activations only
            param.requires_grad_(False)
        self.prep = prep
        self.normalize = normalize  # uint8 NHWC crops -> the network's float input (``loader.Normalizer``)
        self._layer = target_layer(self.model, arch)
        self._lock = threading.Lock()

    def crop_heatmap(self, crop: np.ndarray, class_index: int | None = None) -> tuple[np.ndarray, int]:
        """(heat map over the crop, float32 (crop, crop) in [0, 1]; the class explained: ``class_index``, or
        the network's top class)."""
        kept: dict[str, torch.Tensor] = {}

        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            kept["activations"] = output
            output.register_hook(lambda grad: kept.__setitem__("gradients", grad))

        with self._lock, torch.enable_grad():
            handle = self._layer.register_forward_hook(hook)
            try:
                device = next(self.model.parameters()).device
                x = self.normalize(torch.from_numpy(np.ascontiguousarray(crop[None])).to(device)).float()
                x = x.contiguous().requires_grad_(True)  # the graph starts at the input: parameters are frozen
                logits = self.model(x)
                index = int(logits.argmax(1)) if class_index is None else int(class_index)
                logits[0, index].backward()
            finally:
                handle.remove()
            activations, gradients = kept["activations"].detach(), kept["gradients"].detach()
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activations).sum(dim=1, keepdim=True)).float()
        size = self.prep.crop_size
        cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        peak = float(cam.max())
        heat = (cam / peak).clamp(0, 1) if peak > 0 else torch.zeros_like(cam)
        return heat.cpu().numpy().astype(np.float32), index

    def image_heatmap(self, crop_heat: np.ndarray, original: tuple[int, int]) -> np.ndarray:
        """The crop's heat map placed where the centre crop lies in the original (width, height) image:
        float32 (height, width); 0 outside the crop."""
        width, height = original
        side = min(width, height) * self.prep.crop_size / self.prep.resize_size  # the crop, in input pixels
        left, top = (width - side) / 2, (height - side) / 2
        out = np.zeros((height, width), dtype=np.float32)
        x0, y0 = max(0, round(left)), max(0, round(top))
        x1, y1 = min(width, round(left + side)), min(height, round(top + side))
        if x1 <= x0 or y1 <= y0:
            return out
        # Resample the crop's map onto the covered pixels (a crop larger than the image is cut to it).
        heat = torch.from_numpy(crop_heat)[None, None]
        full = F.interpolate(
            heat, size=(max(1, round(side)), max(1, round(side))), mode="bilinear", align_corners=False
        )
        fx0, fy0 = x0 - round(left), y0 - round(top)
        patch = full[0, 0, fy0 : fy0 + (y1 - y0), fx0 : fx0 + (x1 - x0)].numpy()
        out[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch
        return out


def heatmap_png(heat: np.ndarray) -> bytes:
    """The heat map as an 8-bit greyscale PNG (0: no evidence, 255: the strongest)."""
    out = io.BytesIO()
    Image.fromarray(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), mode="L").save(out, "PNG", optimize=False)
    return out.getvalue()
