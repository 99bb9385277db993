"""Batches from the pixel store, and augmentation as batched tensor ops on the training device.

The CPU only gathers uint8 pixels from the store's memory-mapped shards (in a background thread, one batch
ahead); random resized crop, flip, the uint8->float conversion and normalisation then run as one batched
``grid_sample`` on the device, instead of per-image PIL transforms in worker processes. Crops are taken
from the stored copy (never upscaled, at most one octave larger than needed) and resized on the fly.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .models import Preprocessing
from .pixelstore import Entry, PixelStore
from .preprocess import eval_batch

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Batch:
    pixels: torch.Tensor  # uint8 (B, H, W, 3), padded to the largest image in the batch for training
    sizes: torch.Tensor  # int (B, 2): each image's real (height, width) inside the padding
    labels: torch.Tensor  # int64 (B,)


class StoredImages:
    """Random access to the stored pixels of a list of images (``finetune.datastore.claim_images``).

    Reads are views of the store's shard maps: no file is opened per image, and the kernel's page cache
    keeps hot data in memory without copying it into the Python heap."""

    def __init__(self, store: PixelStore, entries: Sequence[Entry], labels: Sequence[int] | torch.Tensor) -> None:
        self.store = store
        self.entries = list(entries)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        self._sizes: torch.Tensor | None = None

    def pixels(self, i: int) -> np.ndarray:
        """The stored (height, width, 3) uint8 pixels of the i-th image (memory-mapped, read-only)."""
        return self.store.array(self.entries[i])

    def sizes(self) -> torch.Tensor:
        """(N, 2) stored (height, width) of every image."""
        if self._sizes is None:
            shapes = [(e.height, e.width) for e in self.entries]
            self._sizes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
        return self._sizes

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, indices: Sequence[int]) -> StoredImages:
        return StoredImages(self.store, [self.entries[i] for i in indices], self.labels[list(indices)])

    def advise(self, indices: Sequence[int]) -> None:
        self.store.advise(self.entries[i] for i in indices)

    def padded(self, indices: Sequence[int]) -> Batch:
        """Whole stored images, zero-padded to a common size (for training-time random crops)."""
        self.advise(indices)
        arrays = [self.pixels(i) for i in indices]
        h = max(a.shape[0] for a in arrays)
        w = max(a.shape[1] for a in arrays)
        out = np.zeros((len(arrays), h, w, 3), dtype=np.uint8)
        sizes = np.empty((len(arrays), 2), dtype=np.int64)
        for j, a in enumerate(arrays):
            out[j, : a.shape[0], : a.shape[1]] = a
            sizes[j] = a.shape[:2]
        return Batch(torch.from_numpy(out), torch.from_numpy(sizes), self.labels[list(indices)])

    def center_crops(self, indices: Sequence[int], prep: Preprocessing) -> Batch:
        """The evaluation view (``finetune.preprocess.eval_crop``) of each image: what the predictor sees."""
        self.advise(indices)
        out = eval_batch([self.pixels(i) for i in indices], prep)
        sizes = torch.full((len(indices), 2), prep.crop_size, dtype=torch.int64)
        return Batch(torch.from_numpy(out), sizes, self.labels[list(indices)])


def batches(
    n: int, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    out = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and len(out) > 1 and len(out[-1]) < batch_size:
        out.pop()
    return out


def shard_batches(
    n: int, batch_size: int, rank: int, ranks: int, *, generator: torch.Generator
) -> tuple[list[list[int]], list[list[int]]]:
    """An epoch's batches for one of ``ranks`` data-parallel processes: (global batches, this rank's).

    The seeded order is cut into global batches of ``batch_size x ranks`` (the last, partial one dropped,
    as one process drops its own) and rank r takes positions r, r + ranks, ... of each: across ranks every
    image of the epoch is read exactly once, and each optimizer step sees the images one process with the
    global batch would. The order depends only on the generator (seeded per epoch), so a resumed run
    with the same number of ranks reads what an uninterrupted one would."""
    global_batches = batches(n, batch_size * ranks, generator=generator, drop_last=True)
    return global_batches, [g[rank::ranks] for g in global_batches]


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], *, ahead: int) -> Iterator[R]:
    """``pool.map`` that keeps at most ``ahead`` results in flight (bounded memory) and yields in order."""
    pending: deque[Future[R]] = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield result


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
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(to_float(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, x, self.scale)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def normalize_(self, x: torch.Tensor) -> torch.Tensor:
        """``normalize`` in place, into ``x`` (float, in the memory format wanted): the same values."""
        torch.addcmul(self.shift, x, self.scale, out=x)
        return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 255]. The permuted view of NHWC storage is already channels-last."""
    return x.permute(0, 3, 1, 2).float()


class _BatchBuffers:
    """Output buffers for CPU batches, one per slot of a ring and reused: a fresh 40 MB float batch costs more
    in page faults (the kernel zeroing new pages) than the crops that fill it."""

    def __init__(self, slots: int, batch: int, size: int) -> None:
        self.batch, self.size = batch, size
        self._slots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * slots
        self._lock = threading.Lock()

    def get(self, k: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8, float32) channels-last (b, 3, size, size) buffers for the k-th batch."""
        slot = k % len(self._slots)
        with self._lock:
            pair = self._slots[slot]
            if pair is None:
                shape = (self.batch, 3, self.size, self.size)
                pair = (
                    torch.empty(shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last),
                    torch.empty(shape, dtype=torch.float32).contiguous(memory_format=torch.channels_last),
                )
                self._slots[slot] = pair
        return pair[0][:b], pair[1][:b]


def sample_crops(
    sizes: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop parameters, drawn for a whole batch at once (no Python loop).

    Returns int64 (B, 4) boxes (top, left, height, width) in pixels. Like torchvision: up to ``attempts``
    tries per image for a box that fits, else the whole image at the nearest allowed aspect ratio, centred.
    """
    b = sizes.shape[0]
    h = sizes[:, 0].double()
    w = sizes[:, 1].double()
    target = (h * w).unsqueeze(1) * torch.empty(b, attempts, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_r = torch.empty(b, attempts, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_r)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w.unsqueeze(1)) & (ch <= h.unsqueeze(1))
    found = fits.any(1)
    k = fits.to(torch.int8).argmax(1)  # first attempt that fits
    u = torch.rand(b, 2, dtype=torch.float64, generator=generator)
    bh = ch.gather(1, k.unsqueeze(1)).squeeze(1)
    bw = cw.gather(1, k.unsqueeze(1)).squeeze(1)
    top = torch.floor(u[:, 0] * (h - bh + 1))
    left = torch.floor(u[:, 1] * (w - bw + 1))
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    r = w / h
    fb_w = torch.where(r > ratio[1], torch.round(h * ratio[1]), w)
    fb_h = torch.where(r < ratio[0], torch.round(w / ratio[0]), h)
    bh = torch.where(found, bh, fb_h)
    bw = torch.where(found, bw, fb_w)
    top = torch.where(found, top, torch.div(h - fb_h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(w - fb_w, 2, rounding_mode="floor"))
    return torch.stack([top, left, bh, bw], 1).long()


class TrainAugment:
    """Random resized crop + horizontal flip + normalise, as tensor operations, one batch ahead.

    ``batches()`` yields normalised training batches on the device. Two paths, one result:

    - CUDA: the whole cached images go to the GPU as one padded uint8 batch and a single ``grid_sample``
      does every crop, resize and flip at once (one kernel instead of one per image).
    - CPU: only the crop boxes are cut from the memory-mapped store (never whole images), each resized in
      uint8 with antialiasing (torch's vectorised kernel), then the small batch is converted and normalised;
      all of it in the prefetch thread, so it overlaps the training step.
    """

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
        # Crop threads: torch's resize and copies release the GIL, so they run beside the training step.
        self.workers = max(1, min(4, os.cpu_count() or 1))

    def batches(
        self,
        images: StoredImages,
        order: Sequence[Sequence[int]],
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images on the device, labels on the device) for each index list in ``order``.

        ``shard`` (rank, ranks): ``order`` lists global batches, of which this rank takes positions rank,
        rank + ranks, ... (``shard_batches``). Crops and flips are drawn for the whole global batch on every
        rank, so an image is augmented exactly as one process with the global batch would augment it."""
        # Every random draw happens here, in order, before any work is handed to threads: the batches
        # are the same whatever the threads' timing (a resumed run must see the same crops).
        rank, ranks = shard
        sizes = images.sizes()
        plans = []
        for idx in order:
            boxes = sample_crops(sizes[list(idx)], generator, self.scale)
            flips = self._flips(len(idx), generator)
            plans.append((list(idx)[rank::ranks], boxes[rank::ranks], flips[rank::ranks]))
        if self.device.type == "cuda":
            padded = prefetch(images.padded(idx) for idx, _, _ in plans)
            for batch, (_, boxes, flips) in zip(padded, plans, strict=True):
                yield self(batch, boxes, flips), batch.labels.to(self.device, non_blocking=True)
            return
        ahead = 2 * self.workers
        # A yielded batch stays valid until the consumer has taken two more (it holds one at a time).
        buffers = _BatchBuffers(ahead + 3, max((len(p[0]) for p in plans), default=1), self.out)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="augment") as pool:
            yield from ordered_map(
                pool,
                lambda plan: self._cpu_batch(images, buffers, *plan),
                [(k, idx, boxes.tolist(), flips.tolist()) for k, (idx, boxes, flips) in enumerate(plans)],
                ahead=ahead,
            )

    def _flips(self, b: int, generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(b, generator=generator) < 0.5) if self.hflip else torch.zeros(b, dtype=torch.bool)

    def _cpu_batch(
        self,
        images: StoredImages,
        buffers: _BatchBuffers,
        k: int,
        idx: Sequence[int],
        boxes: list[list[int]],
        flips: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images.advise(idx)
        out, normalized = buffers.get(k, len(idx))
        for j, (i, (top, left, bh, bw), flip) in enumerate(zip(idx, boxes, flips, strict=True)):
            a = images.pixels(i)
            crop = torch.from_numpy(a[top : top + bh, left : left + bw].copy()).permute(
                2, 0, 1
            )  # copy: the map is read-only
            resized = F.interpolate(
                crop.unsqueeze(0), size=(self.out, self.out), mode="bilinear", antialias=True, align_corners=False
            )
            out[j] = resized[0].flip(-1) if flip else resized[0]
        normalized.copy_(out)
        return self.normalize.normalize_(normalized), images.labels[list(idx)]

    def __call__(self, batch: Batch, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """The CUDA path for one padded batch: one ``grid_sample`` for every crop, resize and flip."""
        b, hmax, wmax, _ = batch.pixels.shape
        top, left, bh, bw = boxes.double().unbind(1)
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
