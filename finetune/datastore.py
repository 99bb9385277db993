"""A dataset's images in the pixel store: stored while the dataset is checked, claimed for a job.

``StoreFill`` is what ``load_dataset`` writes into while it verifies (each file is decoded once, for the
check and for the store). ``claim_images`` then pins the shards a job reads and rebuilds, from the dataset's
own files, whatever is missing (evicted since, or stored on another host).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataset import SPLITS, Dataset, DatasetOptions, ProgressFn, load_dataset
from .errors import ImageError
from .images import DEFAULT_MAX_PIXELS
from .loader import StoredImages, ordered_map
from .pixelstore import Entry, Key, Pin, PixelStore, ShardWriter, StoreFullError, target_shard_bytes
from .preprocess import TIERS, stored_pixels, stored_shape, stored_side

log = logging.getLogger(__name__)

MAX_CLAIM_ROUNDS = 3


def open_store(cache_root: str | Path, *, max_bytes: int | None = None) -> PixelStore:
    """The pixel store under an engine cache folder. The per-image cache of earlier versions (``pixels/``:
    one file per image, upscaled to 256 px) is removed: its space is what the store saves."""
    root = Path(cache_root)
    legacy = root / "pixels"
    if legacy.is_dir() and any(p.name.startswith("s") and p.name[1:].isdigit() for p in legacy.iterdir()):
        import shutil

        log.info("removing the old per-image pixel cache %s (replaced by the pixel store)", legacy)
        shutil.rmtree(legacy, ignore_errors=True)
    return PixelStore(root / "pixelstore", max_bytes=max_bytes)


def estimated_bytes(count: int, tier: int) -> int:
    """An upper bound for ``count`` images stored at ``tier`` (4:3 images at least tier px high)."""
    h, w = stored_shape(tier * 4 // 3 + 1, tier, tier)
    return count * h * w * 3


@dataclass
class StoreFill:
    """Where the dataset check puts what it decodes: the store at ``tier``, through ``writer``.

    ``strict``: a dataset over the store's budget is an error (a job: it could not keep its images pinned);
    otherwise storing just stops there (an upload's check: the job stores the rest when it runs)."""

    store: PixelStore
    tier: int
    writer: ShardWriter
    strict: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    stored_bytes: int = 0
    full: bool = False
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, count: int) -> None:
        """Size the shards for ``count`` images (known once the files are listed)."""
        self.writer.target_bytes = target_shard_bytes(estimated_bytes(count, self.tier))

    def known(self, sha: str) -> Entry | None:
        entry = self.store.find_for_tier(sha, self.tier)
        if entry is not None:
            self._count(entry.nbytes)
        return entry

    def add(self, sha: str, pixels: np.ndarray, original: tuple[int, int]) -> None:
        side = stored_side(original[0], original[1], self.tier)
        if side != min(pixels.shape[:2]):  # the key must be computable from the report's sizes alone
            raise ImageError(f"internal: stored short side {min(pixels.shape[:2])} != {side} for {original}")
        if self._count(pixels.nbytes):
            self.writer.add(sha, side, pixels, original)

    def _count(self, nbytes: int) -> bool:
        with self._mutex:
            self.stored_bytes += nbytes
            if self.stored_bytes <= self.store.max_bytes:
                return not self.full
            if self.strict:
                raise StoreFullError(over_budget_message(self.store, self.stored_bytes, self.tier))
            if not self.full:
                log.info("dataset is larger than the pixel store's budget; storing stops here")
            self.full = True
            return False


def over_budget_message(store: PixelStore, needed: int, tier: int) -> str:
    return (
        f"the images need more than {needed / 1e9:.2f} GB of decoded pixels at {tier} px, more than the pixel "
        f"store's budget of {store.max_bytes / 1e9:.2f} GB: raise FINETUNE_CACHE_MAX_BYTES (or train at a "
        f"smaller image size, which reads a smaller copy: tiers {', '.join(map(str, TIERS))} px)"
    )


def sample_key(sha: str, width: int, height: int, tier: int) -> Key:
    return sha, stored_side(width, height, tier)


def claim_images(
    store: PixelStore,
    pin: Pin,
    tier: int,
    root: Path,
    samples: Sequence[tuple[str, str, int, int, int]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
) -> StoredImages:
    """Pin the stored pixels of ``samples`` ((path under ``root``, sha, width, height, label)) and return
    random access to them. Entries that are not stored (evicted, or never built on this host) are decoded
    again from their files first; the pin keeps everything claimed readable until it is released."""
    keys = [sample_key(sha, w, h, tier) for _, sha, w, h, _ in samples]
    unique = list(dict.fromkeys(keys))
    found: dict[Key, Entry] = {}
    for _ in range(MAX_CLAIM_ROUNDS):
        found, missing = pin.claim(unique)
        if not missing:
            break
        _rebuild(store, pin, tier, root, samples, keys, set(missing), max_pixels, workers)
    else:
        raise RuntimeError(f"{len(missing)} image(s) kept disappearing from the pixel store while being claimed")
    return StoredImages(store, [found[k] for k in keys], [label for *_, label in samples])


def _rebuild(
    store: PixelStore,
    pin: Pin,
    tier: int,
    root: Path,
    samples: Sequence[tuple[str, str, int, int, int]],
    keys: list[Key],
    missing: set[Key],
    max_pixels: int,
    workers: int,
) -> None:
    todo = {}
    for (path, *_), key in zip(samples, keys, strict=True):
        if key in missing and key not in todo:
            todo[key] = root / path
    log.info("decoding %d image(s) into the pixel store at %d px", len(todo), tier)

    def build(item: tuple[Key, Path]) -> None:
        (sha, side), path = item
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise ImageError(f"{path} changed since the dataset was checked")
        pixels, original = stored_pixels(data, tier, max_pixels=max_pixels)
        writer.add(sha, side, pixels, original)

    writer = store.writer(expected_bytes=estimated_bytes(len(todo), tier), pin=pin)
    with writer, ThreadPoolExecutor(max(1, workers)) as pool:
        for _ in ordered_map(pool, build, list(todo.items()), ahead=4 * max(1, workers)):
            pass


@dataclass
class StoredDataset:
    """A checked dataset whose splits are pinned in the pixel store until ``close()``."""

    dataset: Dataset
    splits: dict[str, StoredImages]
    store: PixelStore
    pin: Pin
    tier: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def reclaim(self, tier: int) -> None:
        """Read the splits at another tier (a run whose image size was chosen once the sizes were known).
        Images no larger than both tiers are the same stored copy; larger ones are decoded again at it."""
        self.splits = claim_splits(self.store, self.pin, self.dataset, tier, max_pixels=self.max_pixels)
        self.tier = tier

    def close(self) -> None:
        try:
            self.pin.release()
        finally:
            self.store.close()

    def __enter__(self) -> StoredDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_into_store(
    source: str | Path,
    *,
    cache_root: str | Path,
    tier: int,
    options: DatasetOptions | None = None,
    extract_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    max_bytes: int | None = None,
) -> StoredDataset:
    """``load_dataset`` with every usable image in the pixel store at ``tier``, each split pinned.

    Raises ``StoreFullError`` (before decoding past the budget) when the images cannot fit the store."""
    options = options or DatasetOptions()
    store = open_store(cache_root, max_bytes=max_bytes)
    pin = store.pin()
    try:
        with store.writer(pin=pin) as writer:
            fill = StoreFill(store, tier, writer, strict=True, max_pixels=options.max_pixels)
            dataset = load_dataset(source, options=options, store=fill, extract_dir=extract_dir, progress=progress)
        splits = claim_splits(store, pin, dataset, tier, max_pixels=options.max_pixels)
    except BaseException:
        pin.release()
        store.close()
        raise
    return StoredDataset(dataset, splits, store, pin, tier, options.max_pixels)


def claim_splits(
    store: PixelStore, pin: Pin, dataset: Dataset, tier: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, StoredImages]:
    """Every split of ``dataset`` claimed at ``tier`` (``StoreFullError`` when they cannot fit the store)."""
    rows = {name: [(s.path, s.sha256, s.width, s.height, s.label) for s in dataset.split(name)] for name in SPLITS}
    needed = sum(_stored_bytes(w, h, tier) for split in rows.values() for _, _, w, h, _ in split)
    if needed > store.max_bytes:
        raise StoreFullError(over_budget_message(store, needed, tier))
    return {
        name: claim_images(store, pin, tier, dataset.root, split, max_pixels=max_pixels) for name, split in rows.items()
    }


def _stored_bytes(width: int, height: int, tier: int) -> int:
    h, w = stored_shape(width, height, tier)
    return h * w * 3
