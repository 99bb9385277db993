"""Datasets: turning a received upload into a checked dataset folder and its row, and reading them back.

The engine does all the checking (``finetune.dataset.load_dataset``); this module only places files and
rows. An upload's row exists from the moment its body is received (status ``checking``, with progress and a
lease its checker renews), so a client can watch a long check; it becomes ``ready`` with its files in place,
or ``refused`` with the reason and nothing else (``app.services.dataset_checks`` runs the check).

A dataset folder holds ``images/`` (as uploaded, under generated names), ``report.json`` (the report
without the per-file list) and ``files.jsonl`` (one line per usable file: shown path, stored path, class,
split): pages and the API read the summary from the row and page through the file list, so a dataset of a
million images is never one JSON document in memory.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.clock import db_now
from app.db.tables import Dataset, Job, JobStatus, User, new_id
from app.domain_errors import Conflict, NotFound
from app.services import owned
from app.services.uploads import INCOMING_DIR, ReceivedUpload
from app.settings import Settings
from app.storage import Storage, tree_bytes
from finetune.archive import ArchiveLimits, extract_zip
from finetune.datacheck import check_folder
from finetune.dataset import DatasetOptions
from finetune.datastore import StoreFill
from finetune.images import open_image
from finetune.pixelstore import PixelStore, ShardWriter

# The upload check decodes every image anyway: it keeps the pixels at the 256 px tier (what AlexNet,
# GoogLeNet and the ResNets read at 224 px crops), staged, so a job on this host decodes nothing again.
# They become part of the store only if the dataset is accepted.
UPLOAD_TIER = 256
IMAGES_DIR = "images"
REPORT_FILE = "report.json"
FILES_FILE = "files.jsonl"
SPLITS_DIR = "splits"  # lists of the dataset's images for jobs that split them their own way
THUMBNAILS_PER_CLASS = 4
THUMBNAIL_SIZE = 160
ACTIVE_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
# The row's summary lists at most this many skipped files and duplicate groups (report.json has them all).
SUMMARY_LIST_LIMIT = 200

ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class CheckedDataset:
    folder: Path  # the images folder inside the temp dir, ready to be moved into place
    report: dict[str, Any]  # without its "files" when ``files`` is given
    size_bytes: int
    pixels: ShardWriter | None = None  # the decoded pixels, staged in the store until keep_pixels()
    files: Path | None = None  # the report's file list, as the dataset's files.jsonl (moved into place)

    def keep_pixels(self) -> None:
        """The dataset is accepted (its row committed): its staged pixels join the store."""
        if self.pixels is not None:
            self.pixels.commit()
            self.pixels = None

    def drop_pixels(self) -> None:
        """The dataset was not stored after all: nothing of its pixels stays."""
        if self.pixels is not None:
            self.pixels.abort()
            self.pixels = None


def check_upload(
    received: ReceivedUpload, temp: Path, settings: Settings, store: PixelStore, progress: ProgressFn | None = None
) -> CheckedDataset:
    """Blocking: extract (zip) or arrange (files) under ``temp/images`` and run the engine's check.

    Files are stored under generated names (``received.names``: cleaned folders, a counter per file), never
    their own; the originals go to the folder's names file, and the engine's report shows them. The
    decoded pixels are staged in ``store``: the caller keeps them (``keep_pixels``) once the dataset is
    stored, or drops them; a refused upload leaves nothing in the store."""
    report_progress = progress or (lambda phase, done, total: None)
    images = temp / IMAGES_DIR
    if received.archive is not None:
        limits = ArchiveLimits(
            max_entries=settings.max_archive_entries,
            max_total_bytes=settings.max_extracted_bytes,
            max_ratio=settings.max_compression_ratio,
        )
        extract_zip(
            received.archive,
            images,
            limits,
            display_name=received.archive_name,
            rename=received.names,
            progress=lambda done, total: report_progress("extracting", done, total),
        )
        received.archive.unlink()
    else:
        images.mkdir()
        for stored, path in received.files:  # stored paths come from received.names, never from the client
            target = images.joinpath(*stored.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        received.names.write(images)
    received.names.close()
    shutil.rmtree(temp / INCOMING_DIR, ignore_errors=True)
    writer = store.writer(staged=True)
    options = DatasetOptions(max_pixels=settings.max_image_pixels)
    try:
        fill = StoreFill(store, UPLOAD_TIER, writer, strict=False, max_pixels=settings.max_image_pixels)
        # Per-file records stay in a temporary file, not in this process's memory: a check of a million
        # images holds what a check of a hundred holds.
        with check_folder(
            images, options=options, store=fill, progress=lambda done, total: report_progress("checking", done, total)
        ) as dataset:
            report_progress("storing", 0, 0)
            report = dict(dataset.report)
            # The images folder may have a single wrapper folder the engine descended into; keep that
            # relative root so file paths in the report resolve, and never show the server's absolute paths.
            report["root"] = str(dataset.root.relative_to(images)) if dataset.root != images else "."
            files = temp / FILES_FILE
            report["samples"] = _write_files(dataset.files(), dataset.classes, files)
    except BaseException:
        writer.abort()
        raise
    # What drew the split: a job with the same seed and fractions trains on exactly this split.
    report["split_options"] = split_options(options.seed, options.val_fraction, options.test_fraction)
    size = tree_bytes(images)
    return CheckedDataset(images, report, size, writer, files)


def _write_files(files: Iterator[dict[str, str]], classes: list[str], path: Path) -> dict[str, list[dict[str, Any]]]:
    """Write the file list as ``FILES_FILE`` (one file a line) and return a few files per class for
    thumbnails: {class: [{"index": position in the file list, "stored": path}]}."""
    picks: dict[str, list[dict[str, Any]]] = {c: [] for c in classes}
    with open(path, "w") as out:
        for i, f in enumerate(files):
            out.write(json.dumps(f, separators=(",", ":")) + "\n")
            chosen = picks[f["class"]]
            if len(chosen) < THUMBNAILS_PER_CLASS:
                chosen.append({"index": i, "stored": f.get("stored", f["path"])})
    return picks


def create_pending(session: Session, owner: User, name: str, source: str, lease_seconds: float) -> Dataset:
    """The row of an upload whose body has arrived and is about to be checked (committed by the caller)."""
    dataset_id = new_id()
    dataset = Dataset(
        id=dataset_id,
        owner_id=owner.id,
        name=name,
        source=source,
        storage_key=Storage.dataset_key(dataset_id),
        num_images=0,
        num_classes=0,
        classes=[],
        report={},
        size_bytes=0,
        status="checking",
        progress={"phase": "queued", "done": 0, "total": 0},
        lease_expires_at=db_now(lease_seconds),
    )
    session.add(dataset)
    session.flush()
    return dataset


def renew(session: Session, dataset_id: str, lease_seconds: float, progress: dict[str, Any] | None = None) -> bool:
    """The checker is alive (and how far it got). False when the row is no longer being checked by it."""
    values: dict[str, Any] = {"lease_expires_at": db_now(lease_seconds)}
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Dataset).where(Dataset.id == dataset_id, Dataset.status == "checking").values(**values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def accept(session: Session, storage: Storage, dataset_id: str, checked: CheckedDataset) -> Dataset | None:
    """Move the checked folder into place and mark the row ready (the caller commits). None when the row is
    no longer being checked (deleted, or given up as interrupted): nothing is moved then."""
    dataset = session.get(Dataset, dataset_id, with_for_update=True)
    if dataset is None or dataset.status != "checking":
        return None
    report = checked.report
    target = storage.path(dataset.storage_key)
    target.mkdir(parents=True)
    if checked.files is not None:
        os.replace(checked.files, target / FILES_FILE)
    else:
        with open(target / FILES_FILE, "w") as f:
            for entry in report.get("files", []):
                f.write(json.dumps(entry, separators=(",", ":")) + "\n")
    full = {k: v for k, v in report.items() if k != "files"}
    (target / REPORT_FILE).write_text(json.dumps(full))
    checked.folder.rename(target / IMAGES_DIR)
    storage.publish(dataset.storage_key)  # with object storage: to the bucket, this host keeping its copy
    dataset.num_images = report["num_images"]
    dataset.num_classes = len(report["classes"])
    dataset.classes = report["classes"]
    dataset.report = summary(report)
    dataset.size_bytes = checked.size_bytes
    dataset.status = "ready"
    dataset.progress = None
    dataset.lease_expires_at = None
    session.flush()
    return dataset


def refuse(session: Session, dataset_id: str, code: str, message: str, *, keep_record: bool) -> None:
    """The upload was refused: its row goes (``keep_record``: stays as ``refused`` with the reason)."""
    if keep_record:
        session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id, Dataset.status == "checking")
            .values(status="refused", error={"code": code, "message": message}, progress=None, lease_expires_at=None)
        )
    else:
        dataset = session.get(Dataset, dataset_id)
        if dataset is not None and dataset.status == "checking":
            session.delete(dataset)
    session.flush()


def sweep_interrupted(session: Session, storage: Storage) -> int:
    """Uploads whose checker stopped renewing its lease (its process died) are refused, their files removed."""
    stale = list(
        session.scalars(select(Dataset).where(Dataset.status == "checking", Dataset.lease_expires_at < db_now()))
    )
    for dataset in stale:
        refuse(
            session,
            dataset.id,
            "interrupted",
            "the service stopped while this upload was being checked; upload it again",
            keep_record=True,
        )
        storage.delete(dataset.storage_key)
    return len(stale)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the row keeps: the report without the per-file list, long lists cut (report.json has them)."""
    out = {k: v for k, v in report.items() if k != "files"}
    for key in ("skipped", "duplicates"):
        items = out.get(key, [])
        if len(items) > SUMMARY_LIST_LIMIT:
            out[key] = items[:SUMMARY_LIST_LIMIT]
        out[f"{key}_total"] = len(items)
    return out


def split_options(seed: int, val_fraction: float, test_fraction: float) -> dict[str, Any]:
    return {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}


# Datasets uploaded before the options were recorded were split with the defaults.
DEFAULT_SPLIT_OPTIONS = split_options(0, 0.1, 0.1)


def split_file_for(storage: Storage, dataset: Dataset, seed: int, val_fraction: float, test_fraction: float) -> Path:
    """The list of images a job on ``dataset`` trains on, for the engine's ``split_file``: the dataset's own
    record (the images its check accepted, in the split its page shows) when the job asks for the split the
    dataset was made with; otherwise the same images without their split, so the job draws its own with its
    seed and fractions (and records it in its run folder and on its row). Lists live in the dataset's folder,
    one per set of options, written once (atomically) and shared by every job that asks for them."""
    recorded = (dataset.report or {}).get("split_options") or DEFAULT_SPLIT_OPTIONS
    own = recorded == split_options(seed, val_fraction, test_fraction)
    folder = storage.path(dataset.storage_key)
    if own and (folder / FILES_FILE).exists():
        return folder / FILES_FILE
    name = "recorded.jsonl" if own else f"seed{seed}-val{val_fraction:g}-test{test_fraction:g}.jsonl"
    target = folder / SPLITS_DIR / name
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(f".{name}.{new_id()}.tmp")
        with open(tmp, "w") as f:
            for entry in iter_files(storage, dataset):
                line = {"stored": entry.get("stored", entry["path"]), "split": entry["split"] if own else None}
                f.write(json.dumps(line) + "\n")
        tmp.replace(target)
    return target


def dataset_images_folder(storage: Storage, dataset: Dataset) -> Path:
    """The images folder as uploaded (with its names file): what the engine is given to train on."""
    return storage.path(dataset.storage_key) / IMAGES_DIR


def dataset_images_root(storage: Storage, dataset: Dataset) -> Path:
    """The folder the engine reads (the images folder, or the wrapper folder inside it)."""
    root = storage.path(dataset.storage_key) / IMAGES_DIR
    rel = dataset.report.get("root", ".")
    return root if rel in (".", "") else root / rel


def full_report(storage: Storage, dataset: Dataset) -> dict[str, Any]:
    """The whole report, file list included (in memory: for small datasets and old ones; see ``report_chunks``)."""
    report: dict[str, Any] = json.loads(storage.fetch_file(f"{dataset.storage_key}/{REPORT_FILE}").read_text())
    if "files" not in report:
        report["files"] = list(iter_files(storage, dataset))
    return report


def iter_files(storage: Storage, dataset: Dataset) -> Iterator[dict[str, str]]:
    """Every usable file of the dataset, in the report's order, read one line at a time."""
    listed = storage.fetch_file(f"{dataset.storage_key}/{FILES_FILE}")  # (no such object: no local file)
    if not listed.exists():  # a dataset stored before files.jsonl: the list is in the report
        report = storage.fetch_file(f"{dataset.storage_key}/{REPORT_FILE}")
        yield from json.loads(report.read_text()).get("files", [])
        return
    with open(listed) as f:
        for line in f:
            yield json.loads(line)


def report_chunks(storage: Storage, dataset: Dataset) -> Iterator[bytes]:
    """The full report as JSON, streamed: the summary, then the file list a line at a time."""
    head = json.loads(storage.fetch_file(f"{dataset.storage_key}/{REPORT_FILE}").read_text())
    head.pop("files", None)
    opening = json.dumps(head)[:-1] + (', "files": [' if head else '"files": [')  # "{...," without its "}"
    yield opening.encode()
    for i, entry in enumerate(iter_files(storage, dataset)):
        yield (b"," if i else b"") + json.dumps(entry).encode()
    yield b"]}"


def files_page(
    storage: Storage, dataset: Dataset, offset: int, limit: int, cls: str | None = None, split: str | None = None
) -> dict[str, Any]:
    """One page of the file list, optionally of one class and/or split: {"total", "offset", "limit", "files"}
    (each file with its ``index`` in the whole list, the index the thumbnails take)."""
    page: list[dict[str, Any]] = []
    total = 0
    for index, entry in enumerate(iter_files(storage, dataset)):
        if (cls is not None and entry["class"] != cls) or (split is not None and entry["split"] != split):
            continue
        if offset <= total < offset + limit:
            page.append({"index": index, **entry})
        total += 1
    return {"total": total, "offset": offset, "limit": limit, "files": page}


def get_owned(session: Session, owner: User, dataset_id: str) -> Dataset:
    return owned.get_owned(session, owner, Dataset, dataset_id, "dataset")


def list_owned(session: Session, owner: User) -> list[Dataset]:
    return list(session.scalars(owned.owned_query(owner, Dataset)))


def thumbnail_indices(storage: Storage, dataset: Dataset) -> dict[str, list[int]]:
    """A few file indices per class, for thumbnails (indices into the report's file list)."""
    samples = (dataset.report or {}).get("samples")
    if samples is not None:
        return {c: [s["index"] for s in samples.get(c, [])] for c in dataset.classes}
    picks: dict[str, list[int]] = {c: [] for c in dataset.classes}
    for i, f in enumerate(iter_files(storage, dataset)):  # datasets stored before samples were recorded
        if len(picks[f["class"]]) < THUMBNAILS_PER_CLASS:
            picks[f["class"]].append(i)
    return picks


def thumbnail(storage: Storage, dataset: Dataset, index: int) -> bytes:
    """A small JPEG of the index-th file (the path comes from our report, never from the request)."""
    if dataset.status != "ready" or index < 0:
        raise NotFound("image", str(index))
    stored = _stored_path(storage, dataset, index)
    if stored is None:
        raise NotFound("image", str(index))
    path = dataset_images_root(storage, dataset) / stored
    img = open_image(storage.fetch_file(path.relative_to(storage.root).as_posix()))
    img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def _stored_path(storage: Storage, dataset: Dataset, index: int) -> str | None:
    # "stored" is where a renamed file is ("path" is the user's name for it); older reports have only "path".
    for picks in (dataset.report or {}).get("samples", {}).values():
        for pick in picks:
            if pick["index"] == index:
                return str(pick["stored"])
    for i, f in enumerate(iter_files(storage, dataset)):
        if i == index:
            return f.get("stored", f["path"])
    return None


def delete_dataset(session: Session, dataset: Dataset) -> str:
    """Delete the row (refused while it is checked or a job uses it); returns the storage key to remove after
    commit."""
    if dataset.status == "checking":
        raise Conflict(f"dataset {dataset.id} is still being checked; delete it once it is ready", code="in_use")
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
