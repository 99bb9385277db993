"""Models: reading and deleting trained models, their settings, packing a model's checkpoint bundle, and the
gallery of test images a model got wrong.

A model's files are found from its row's ``run_key`` through Storage, never from anything in a request.
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import Job, Model, User
from app.domain_errors import Conflict, NotFound
from app.services import owned
from app.storage import Storage
from finetune.checkpoint import META_FILE, MODEL_FILE, load_checkpoint
from finetune.errors import CheckpointError, ImageError
from finetune.images import open_image

REPORT_FILE = "report.json"


def get_owned(session: Session, owner: User, model_id: str) -> Model:
    return owned.get_owned(session, owner, Model, model_id, "model")


def list_owned(session: Session, owner: User) -> list[Model]:
    return list(session.scalars(owned.owned_query(owner, Model)))


def delete_model(session: Session, model: Model) -> str | None:
    """Delete the row; returns the run folder to remove after commit (None while a job row still points
    at it: the job's page and resume need those files)."""
    in_use = session.scalar(select(func.count()).select_from(Job).where(Job.run_key == model.run_key))
    key = model.run_key
    session.delete(model)
    session.flush()
    return None if in_use else key


def threshold_info(model: Model) -> dict[str, Any]:
    """The threshold predict uses (``value``) and where it comes from: the owner's, else the one chosen on
    validation after training (recorded with the calibration), else none."""
    calibration = (model.evaluation or {}).get("calibration") or {}
    chosen, target = calibration.get("threshold"), calibration.get("target_precision")
    value: float | None
    if model.threshold is not None:
        value, source = model.threshold, "owner"
    else:
        value, source = chosen, "validation" if chosen is not None else "none"
    return {"value": value, "source": source, "chosen": chosen, "target_precision": target}


def set_threshold(session: Session, model: Model, threshold: float | None) -> None:
    """The owner's "unknown" threshold (None: back to the one chosen on validation)."""
    model.threshold = threshold
    session.flush()


def unavailable(model_id: str) -> Conflict:
    return Conflict(f"the files of model {model_id} are missing or incomplete on this server", code="model_unavailable")


def bundle_files(storage: Storage, model: Model) -> list[tuple[str, Path]]:
    """(name in the zip, file) for the download: the best checkpoint's weights and metadata, and the
    run's evaluation report."""
    run_dir = storage.fetch_once(model.run_key)
    try:
        ckpt = load_checkpoint(run_dir, "best")
    except CheckpointError:
        raise unavailable(model.id) from None
    files = [(MODEL_FILE, ckpt.path / MODEL_FILE), (META_FILE, ckpt.path / META_FILE)]
    if (run_dir / REPORT_FILE).is_file():
        files.append((REPORT_FILE, run_dir / REPORT_FILE))
    return files


def write_bundle(files: list[tuple[str, Path]], target: Path) -> None:
    """Blocking: the zip of ``files``. Weights are stored, not deflated: floats barely compress and
    deflating a 200 MB file costs seconds."""
    with zipfile.ZipFile(target, "w") as zf:
        for name, path in files:
            compress = zipfile.ZIP_STORED if name == MODEL_FILE else zipfile.ZIP_DEFLATED
            zf.write(path, name, compress_type=compress)


# -- the misclassified gallery ------------------------------------------------------------------------------
MISCLASSIFIED_THUMBNAIL = 160


@functools.lru_cache(maxsize=16)
def _read_misclassified(path: str, mtime_ns: int) -> dict[str, Any]:
    """report.json's ``misclassified`` record (parsed once per file version: thumbnails ask for it often)."""
    del mtime_ns  # part of the cache key only
    record = json.loads(Path(path).read_text()).get("misclassified")
    return record if isinstance(record, dict) else {}


def misclassified_record(storage: Storage, model: Model) -> dict[str, Any]:
    """The test images the model got wrong, as the final evaluation recorded them ({} for models trained
    before it did)."""
    path = storage.fetch_once(model.run_key) / REPORT_FILE
    try:
        return _read_misclassified(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError):
        return {}


def misclassified_gallery(
    storage: Storage,
    model: Model,
    *,
    true: int | None = None,
    predicted: int | None = None,
    offset: int = 0,
    limit: int = 12,
) -> dict[str, Any]:
    """The misclassified test images grouped by confusion (true -> predicted), the most frequent first; each
    group with ``count`` and its items from ``offset`` (at most ``limit``), most confident first. ``true``
    and ``predicted`` keep one confusion-matrix cell (or one row or column)."""
    record = misclassified_record(storage, model)
    classes = list(model.classes)
    items = record.get("items") or []
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for index, item in enumerate(items):
        t, p = int(item["true"]), int(item["predicted"])
        if (true is not None and t != true) or (predicted is not None and p != predicted):
            continue
        groups.setdefault((t, p), []).append(
            {
                "index": index,
                "path": item["path"],
                "probability": item["probability"],
                "thumbnail_url": f"/api/v1/models/{model.id}/misclassified/{index}/thumbnail",
            }
        )
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    confusions = []
    for (t, p), members in ordered:
        members.sort(key=lambda m: -m["probability"])
        confusions.append(
            {
                "true": classes[t] if t < len(classes) else str(t),
                "true_index": t,
                "predicted": classes[p] if p < len(classes) else str(p),
                "predicted_index": p,
                "count": len(members),
                "items": members[offset : offset + limit],
            }
        )
    return {
        "available": bool(record),
        "split": record.get("split", "test"),
        "images": record.get("count", 0),
        "total": record.get("total", 0),
        "recorded": len(items),
        "offset": offset,
        "limit": limit,
        "confusions": confusions,
    }


def misclassified_thumbnail(storage: Storage, model: Model, index: int) -> bytes:
    """A small JPEG of the index-th misclassified image. The file is the one the run's own report names
    (never a path from the request), and must lie inside the dataset's folder in the data folder."""
    record = misclassified_record(storage, model)
    items = record.get("items") or []
    if not 0 <= index < len(items):
        raise NotFound("image", str(index))
    run_dir = storage.path(model.run_key)
    root = (run_dir / str(record.get("root_from_run", ""))).resolve()
    path = (root / str(items[index]["path"])).resolve()
    if not root.is_relative_to(storage.root) or not path.is_relative_to(root) or path == root:
        raise NotFound("image", str(index))
    try:
        img = open_image(storage.fetch_file(path.relative_to(storage.root).as_posix()))
    except (OSError, ImageError):  # the dataset was deleted or its file changed since training
        raise NotFound("image", str(index)) from None
    img.thumbnail((MISCLASSIFIED_THUMBNAIL, MISCLASSIFIED_THUMBNAIL), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()
