"""The decode-once pixel cache.

Each image is decoded and resized once (short side to the model's resize size) and stored as raw
uint8 RGB pixels under its content hash and that size. Reads are memory-mapped, so later epochs, later
runs and other models at the same size never decode it again, and the OS page cache keeps hot data in
memory without copying it into the Python heap.

File layout: ``<root>/s<size>/<sha[:2]>/<sha>.px`` = a 32-byte header (magic, original width and height,
stored width and height) followed by height*width*3 bytes. Files are written to a temporary name and
renamed, so a reader sees either a whole entry or none; a torn file (wrong length) counts as missing.
"""

from __future__ import annotations

import mmap
import os
import struct
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, cap_aspect, decode_for_size

_MAGIC = b"PXC1"
_HEADER = struct.Struct("<4sIIII12x")  # 32 bytes
# Training crops never ask for an aspect ratio beyond 4:3 (torchvision's RandomResizedCrop range), so
# the long side is centre-cropped to that: smaller cache, fewer pixels to move, same crops.
MAX_ASPECT = 4 / 3


class PixelCache:
    """Decoded pixels at one short-side size, keyed by the SHA-256 of the file's bytes."""

    def __init__(self, root: str | Path, short_side: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(root)
        self.short_side = short_side
        self.max_pixels = max_pixels
        self.dir = self.root / f"s{short_side}"

    def path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.px"

    def original_size(self, sha256: str) -> tuple[int, int] | None:
        """(width, height) of the source image if a complete entry exists, else None."""
        header = self._header(sha256)
        return None if header is None else (header[0], header[1])

    def stored_shape(self, sha256: str) -> tuple[int, int]:
        """(height, width) of the stored pixels (header only, no pixel is read)."""
        header = self._header(sha256)
        if header is None:
            raise FileNotFoundError(self.path(sha256))
        return header[3], header[2]

    def _header(self, sha256: str) -> tuple[int, int, int, int] | None:
        """(original width, original height, stored width, stored height) of a complete entry."""
        p = self.path(sha256)
        try:
            with open(p, "rb") as f:
                header = f.read(_HEADER.size)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            return None
        if len(header) != _HEADER.size:
            return None
        magic, ow, oh, w, h = _HEADER.unpack(header)
        if magic != _MAGIC or size != _HEADER.size + w * h * 3:
            return None
        return ow, oh, w, h

    def load(self, sha256: str) -> np.ndarray:
        """The stored pixels as a read-only (height, width, 3) uint8 memory map."""
        p = self.path(sha256)
        # A bare mmap viewed by np.frombuffer: a quarter of np.memmap's cost per file, which matters
        # when every batch opens a few hundred entries. The array keeps the mapping alive.
        with open(p, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, _ow, _oh, w, h = _HEADER.unpack_from(mm)
        if magic != _MAGIC or len(mm) != _HEADER.size + w * h * 3:
            raise ValueError(f"{p} is not a whole pixel cache entry")
        return np.frombuffer(mm, dtype=np.uint8, count=w * h * 3, offset=_HEADER.size).reshape(h, w, 3)

    def add(self, sha256: str, data: bytes | str | Path) -> tuple[int, int]:
        """Decode ``data`` (bytes or a path), store it, and return the original (width, height).

        Raises ``ImageError`` when the data is not an acceptable image.
        """
        img, original = decode_for_size(data, self.short_side, max_pixels=self.max_pixels)
        self.store(sha256, img, original)
        return original

    def store(self, sha256: str, img: Image.Image, original: tuple[int, int]) -> None:
        arr = np.asarray(cap_aspect(img, MAX_ASPECT), dtype=np.uint8)
        h, w = arr.shape[:2]
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, original[0], original[1], w, h))
            f.write(np.ascontiguousarray(arr).tobytes())
        os.replace(tmp, target)
