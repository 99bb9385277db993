"""The one preprocessing path from an image file to the pixels a model sees.

Two steps, each one function, used by every caller:

1. ``stored_pixels(source, tier)``: decode (``finetune.images``), then downscale the short side to ``tier``
   when it is larger (never up), and centre-cut the long side to 4:3. This is what the pixel store keeps,
   and what the predictor computes from an uploaded image; a 28 px photo stays 28 px.
2. ``eval_crop(stored, prep)``: resize the stored pixels so the short side is ``prep.resize_size`` (up or
   down), then centre-crop ``prep.crop_size``: torchvision's ``Resize`` + ``CenterCrop``.

Evaluation reads step 1 from the store and applies step 2; prediction applies both to the request's bytes;
export takes step 2's output as its input. So the tensor the evaluator sees and the tensor the predictor
builds are the same, bit for bit, for every image size (tests/finetune/test_parity.py).

Training crops (``finetune.loader.TrainAugment``) start from step 1 as well and resize on the device.

A tier is a power of two (32 ... 2048): a job whose resize size is R reads the copy stored at the smallest
tier >= R, so one stored copy serves every image size within an octave (224 px crops and 256 px resizes
read the 256 tier; 112/128 read 128; lenet's 37 reads 64), and an image smaller than its tier is stored
once at its own size whatever the tier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, MAX_DECODE_ASPECT, ImageSource, cap_aspect, decode, resize_short_side

if TYPE_CHECKING:
    from .models import Preprocessing

# Training crops never ask for an aspect ratio beyond 4:3 (RandomResizedCrop's range) and evaluation looks
# at a centred square, so the long side is centre-cut to 4:3: fewer bytes stored and moved, same crops.
STORE_ASPECT = 4 / 3
TIERS = (32, 64, 128, 256, 512, 1024, 2048)


def store_tier(resize_size: int) -> int:
    """The stored resolution (short side) a job with this resize size reads: the smallest tier >= it."""
    for tier in TIERS:
        if tier >= resize_size:
            return tier
    return TIERS[-1]


def stored_side(width: int, height: int, tier: int) -> int:
    """The short side of an image's stored copy at ``tier``: its own short side, or the tier if smaller.
    Together with the file's hash it keys the copy, so small images are stored once for every tier."""
    return min(width, height, tier)


def stored_shape(width: int, height: int, tier: int) -> tuple[int, int]:
    """(height, width) of the stored copy, give or take a pixel of rounding (for size estimates only)."""
    short, long = min(width, height), max(width, height)
    long = min(long, max(1, int(short * MAX_DECODE_ASPECT + 0.5)))
    if short > tier:
        long, short = max(1, round(long * tier / short)), tier
    long = min(long, max(1, int(short * STORE_ASPECT + 0.5)))
    return (long, short) if height >= width else (short, long)


def stored_pixels(
    source: ImageSource, tier: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Step 1: (the (height, width, 3) uint8 pixels stored at ``tier``, the original (width, height)).

    Raises ``ImageError`` for anything that is not an acceptable image."""
    img, original = decode(source, max_pixels=max_pixels, draft_size=tier)
    img = cap_aspect(img, MAX_DECODE_ASPECT)
    if min(img.size) > tier:
        img = resize_short_side(img, tier)
    img = cap_aspect(img, STORE_ASPECT)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)), original


def eval_crop(stored: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Step 2: the (crop, crop, 3) uint8 evaluation view of stored pixels (resize short side, centre crop)."""
    h, w = stored.shape[:2]
    if min(h, w) != prep.resize_size:
        # Pillow's bilinear resize is antialiased when shrinking, as torchvision's Resize is on PIL images.
        stored = np.asarray(resize_short_side(Image.fromarray(stored), prep.resize_size), dtype=np.uint8)
    return np.ascontiguousarray(center_crop_array(stored, prep.crop_size))


def eval_batch(arrays: Sequence[np.ndarray], prep: Preprocessing) -> np.ndarray:
    """``eval_crop`` of each stored image, stacked into one (N, crop, crop, 3) uint8 batch."""
    out = np.empty((len(arrays), prep.crop_size, prep.crop_size, 3), dtype=np.uint8)
    for j, a in enumerate(arrays):
        out[j] = eval_crop(a, prep)
    return out


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
