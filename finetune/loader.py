"""Batches from the pixel cache, and augmentation as batched tensor ops on the training device.

The CPU only gathers uint8 pixels from memory-mapped cache files (in a background thread, one batch
ahead); random resized crop, flip, the uint8->float conversion and normalisation then run as one batched
``grid_sample`` on the device, instead of per-image PIL transforms in worker processes.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import Sample
from .models import Preprocessing
from .pixelcache import PixelCache


@dataclass
class Batch:
    pixels: torch.Tensor  # uint8 (B, H, W, 3), padded to the largest image in the batch for training
    sizes: torch.Tensor  # int (B, 2): each image's real (height, width) inside the padding
    labels: torch.Tensor  # int64 (B,)


class CachedImages:
    """Random access to the cached pixels of a list of samples."""

    def __init__(self, cache: PixelCache, samples: Sequence[Sample]) -> None:
        self.cache = cache
        self.samples = list(samples)
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def padded(self, indices: Sequence[int]) -> Batch:
        """Whole cached images, zero-padded to a common size (for training-time random crops)."""
        arrays = [self.cache.load(self.samples[i].sha256) for i in indices]
        h = max(a.shape[0] for a in arrays)
        w = max(a.shape[1] for a in arrays)
        out = np.zeros((len(arrays), h, w, 3), dtype=np.uint8)
        sizes = np.empty((len(arrays), 2), dtype=np.int64)
        for j, a in enumerate(arrays):
            out[j, : a.shape[0], : a.shape[1]] = a
            sizes[j] = a.shape[:2]
        return Batch(torch.from_numpy(out), torch.from_numpy(sizes), self.labels[list(indices)])

    def center_crops(self, indices: Sequence[int], crop: int) -> Batch:
        """The evaluation view: a centred ``crop`` x ``crop`` square of each cached image."""
        out = np.empty((len(indices), crop, crop, 3), dtype=np.uint8)
        for j, i in enumerate(indices):
            out[j] = center_crop_array(self.cache.load(self.samples[i].sha256), crop)
        sizes = torch.full((len(indices), 2), crop, dtype=torch.int64)
        return Batch(torch.from_numpy(out), sizes, self.labels[list(indices)])


def center_crop_array(a: np.ndarray, crop: int) -> np.ndarray:
    """Centre crop as torchvision's ``CenterCrop`` computes it (pads with zeros if the image is smaller)."""
    h, w = a.shape[:2]
    if h < crop or w < crop:
        padded = np.zeros((max(h, crop), max(w, crop), 3), dtype=np.uint8)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = a
        a, h, w = padded, padded.shape[0], padded.shape[1]
    top = round((h - crop) / 2.0)
    left = round((w - crop) / 2.0)
    return a[top : top + crop, left : left + crop]


def batches(
    n: int, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    out = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and len(out) > 1 and len(out[-1]) < batch_size:
        out.pop()
    return out


def prefetch(make: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """Run ``make`` in a background thread, ``depth`` batches ahead (numpy copies release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in make:
                if stop.is_set():
                    return
                q.put(item)
            q.put(sentinel)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=worker, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


class Normalizer:
    """uint8 NHWC on the device -> normalised float NCHW (channels-last memory when asked)."""

    def __init__(self, prep: Preprocessing, device: torch.device, channels_last: bool) -> None:
        std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
        # (x/255 - mean)/std as one multiply-add
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(to_float(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, x, self.scale)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 255]. The permuted view of NHWC storage is already channels-last."""
    return x.permute(0, 3, 1, 2).float()


def sample_crops(
    sizes: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop parameters, drawn for a whole batch at once.

    Returns float (B, 4) boxes (top, left, height, width) in pixels. Like torchvision: up to ``attempts``
    tries per image for a box that fits, else a centre crop at the clamped aspect ratio.
    """
    b = sizes.shape[0]
    h = sizes[:, 0].double().unsqueeze(1)
    w = sizes[:, 1].double().unsqueeze(1)
    area = h * w
    target = area * torch.empty(b, attempts, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b, attempts, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_r)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1))
    u = torch.rand(b, 2, dtype=torch.float64, generator=generator)
    boxes = torch.empty(b, 4, dtype=torch.float64)
    for i in range(b):
        hi, wi = float(h[i, 0]), float(w[i, 0])
        k = int(first[i])
        if k >= 0:
            bh, bw = float(ch[i, k]), float(cw[i, k])
        else:  # fallback: whole image at the nearest allowed aspect ratio, centred
            r = wi / hi
            if r < ratio[0]:
                bw, bh = wi, round(wi / ratio[0])
            elif r > ratio[1]:
                bh, bw = hi, round(hi * ratio[1])
            else:
                bw, bh = wi, hi
        top = math.floor(u[i, 0] * (hi - bh + 1)) if k >= 0 else (hi - bh) // 2
        left = math.floor(u[i, 1] * (wi - bw + 1)) if k >= 0 else (wi - bw) // 2
        boxes[i] = torch.tensor([top, left, bh, bw], dtype=torch.float64)
    return boxes


class TrainAugment:
    """Random resized crop + horizontal flip + normalise, for a padded uint8 batch, in one ``grid_sample``."""

    def __init__(
        self,
        prep: Preprocessing,
        device: torch.device,
        channels_last: bool,
        *,
        scale: tuple[float, float] = (0.25, 1.0),
        hflip: bool = True,
    ) -> None:
        self.out = prep.crop_size
        self.device = device
        self.scale = scale
        self.hflip = hflip
        self.normalize = Normalizer(prep, device, channels_last)

    def __call__(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        b, hmax, wmax, _ = batch.pixels.shape
        boxes = sample_crops(batch.sizes, generator, self.scale)
        flips = (torch.rand(b, generator=generator) < 0.5) if self.hflip else torch.zeros(b, dtype=torch.bool)
        top, left, bh, bw = boxes.unbind(1)
        # Affine map from output coordinates in [-1, 1] to the crop box inside the padded canvas
        # (align_corners=False: pixel centres at (i + 0.5) / size).
        sx = (bw / wmax) * torch.where(flips, -1.0, 1.0).double()
        sy = bh / hmax
        tx = (2 * left + bw) / wmax - 1
        ty = (2 * top + bh) / hmax - 1
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = sx, tx
        theta[:, 1, 1], theta[:, 1, 2] = sy, ty
        x = to_float(batch.pixels.to(self.device, non_blocking=True))
        grid = F.affine_grid(theta.to(self.device, x.dtype), [b, 3, self.out, self.out], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # Normalising is affine, so it commutes with bilinear sampling: do it on the smaller output.
        return self.normalize.normalize(out)
