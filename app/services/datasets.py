"""Datasets: turning a received upload into a checked dataset folder and its row, and reading them back.

The engine does all the checking (``finetune.dataset.load_dataset``); this module only places files and
rows. A rejected upload leaves nothing behind: its temp folder is removed and no row is written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import Dataset, Job, User
from app.domain_errors import Conflict, NotFound
from app.services.uploads import INCOMING_DIR, ReceivedUpload
from app.settings import Settings
from app.storage import Storage
from finetune.archive import ArchiveLimits, extract_zip
from finetune.dataset import DatasetOptions, load_dataset
from finetune.images import open_image
from finetune.pixelcache import PixelCache

# Uploads pre-fill the pixel cache at 256 px, the resize size of AlexNet, GoogLeNet, ResNet-18/34 at 224:
# the check decodes every image anyway, and training at that size then decodes nothing.
UPLOAD_CACHE_SIZE = 256
IMAGES_DIR = "images"
REPORT_FILE = "report.json"
THUMBNAILS_PER_CLASS = 4
THUMBNAIL_SIZE = 160
ACTIVE_JOB_STATUSES = ("queued", "running")


@dataclass
class CheckedDataset:
    folder: Path  # the images folder inside the temp dir, ready to be moved into place
    report: dict[str, Any]
    size_bytes: int


def check_upload(received: ReceivedUpload, temp: Path, settings: Settings) -> CheckedDataset:
    """Blocking: extract (zip) or arrange (files) under ``temp/images`` and run the engine's check.

    Files are stored under generated names (``received.names``: cleaned folders, a counter per file), never
    their own; the originals go to the folder's names file, and the engine's report shows them."""
    images = temp / IMAGES_DIR
    if received.archive is not None:
        limits = ArchiveLimits(
            max_entries=settings.max_archive_entries,
            max_total_bytes=settings.max_extracted_bytes,
            max_ratio=settings.max_compression_ratio,
        )
        extract_zip(received.archive, images, limits, display_name=received.archive_name, rename=received.names)
        received.archive.unlink()
    else:
        images.mkdir()
        for stored, path in received.files:  # stored paths come from received.names, never from the client
            target = images.joinpath(*stored.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        received.names.write(images)
    shutil.rmtree(temp / INCOMING_DIR, ignore_errors=True)
    dataset = load_dataset(
        images,
        options=DatasetOptions(max_pixels=settings.max_image_pixels),
        pixel_cache=PixelCache(settings.cache_dir / "pixels", UPLOAD_CACHE_SIZE, max_pixels=settings.max_image_pixels),
    )
    report = dataset.report()
    # The images folder may have a single wrapper folder the engine descended into; keep that relative
    # root so file paths in the report resolve, and never show the server's absolute paths.
    report["root"] = str(dataset.root.relative_to(images)) if dataset.root != images else "."
    size = sum(f.stat().st_size for f in images.rglob("*") if f.is_file())
    return CheckedDataset(images, report, size)


def store_dataset(
    session: Session, storage: Storage, owner: User, name: str, source: str, checked: CheckedDataset
) -> Dataset:
    """Move the checked folder into place and add its row (the caller's transaction commits it)."""
    dataset = Dataset(
        owner_id=owner.id,
        name=name,
        source=source,
        storage_key="",
        num_images=checked.report["num_images"],
        num_classes=len(checked.report["classes"]),
        classes=checked.report["classes"],
        report=summary(checked.report),
        size_bytes=checked.size_bytes,
    )
    session.add(dataset)
    session.flush()  # assigns the id
    dataset.storage_key = storage.dataset_key(dataset.id)
    target = storage.path(dataset.storage_key)
    target.mkdir(parents=True)
    (target / REPORT_FILE).write_text(json.dumps(checked.report))
    checked.folder.rename(target / IMAGES_DIR)
    return dataset


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the per-file list (that stays in the dataset folder's report.json)."""
    return {k: v for k, v in report.items() if k != "files"}


def dataset_images_folder(storage: Storage, dataset: Dataset) -> Path:
    """The images folder as uploaded (with its names file): what the engine is given to train on."""
    return storage.path(dataset.storage_key) / IMAGES_DIR


def dataset_images_root(storage: Storage, dataset: Dataset) -> Path:
    """The folder the engine reads (the images folder, or the wrapper folder inside it)."""
    root = storage.path(dataset.storage_key) / IMAGES_DIR
    rel = dataset.report.get("root", ".")
    return root if rel in (".", "") else root / rel


def full_report(storage: Storage, dataset: Dataset) -> dict[str, Any]:
    return json.loads((storage.path(dataset.storage_key) / REPORT_FILE).read_text())


def get_owned(session: Session, owner: User, dataset_id: str) -> Dataset:
    # No id holds a NUL, and PostgreSQL refuses one in a query parameter (a 500 instead of this 404).
    dataset = session.get(Dataset, dataset_id) if "\x00" not in dataset_id else None
    if dataset is None or (dataset.owner_id != owner.id and not owner.is_admin):
        raise NotFound("dataset", dataset_id)
    return dataset


def list_owned(session: Session, owner: User) -> list[Dataset]:
    query = select(Dataset).order_by(Dataset.created_at.desc())
    if not owner.is_admin:
        query = query.where(Dataset.owner_id == owner.id)
    return list(session.scalars(query))


def thumbnail_indices(storage: Storage, dataset: Dataset) -> dict[str, list[int]]:
    """A few file indices per class, for thumbnails (indices into the report's file list)."""
    picks: dict[str, list[int]] = {c: [] for c in dataset.classes}
    for i, f in enumerate(full_report(storage, dataset).get("files", [])):
        if len(picks[f["class"]]) < THUMBNAILS_PER_CLASS:
            picks[f["class"]].append(i)
    return picks


def thumbnail(storage: Storage, dataset: Dataset, index: int) -> bytes:
    """A small JPEG of the index-th file (the path comes from our report, never from the request)."""
    files = full_report(storage, dataset).get("files", [])
    if not 0 <= index < len(files):
        raise NotFound("image", str(index))
    # "stored" is where a renamed file is ("path" is the user's name for it); older reports have only "path".
    path = dataset_images_root(storage, dataset) / files[index].get("stored", files[index]["path"])
    img = open_image(path)
    img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def delete_dataset(session: Session, dataset: Dataset) -> str:
    """Delete the row (refused while a job uses it); returns the storage key to remove after commit."""
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.dataset_id == dataset.id, Job.status.in_(ACTIVE_JOB_STATUSES))
    )
    if active:
        raise Conflict(
            f"dataset {dataset.id} is used by {active} queued or running job(s); cancel them first", code="in_use"
        )
    key = dataset.storage_key
    session.delete(dataset)
    session.flush()
    return key
