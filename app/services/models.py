"""Models: reading and deleting trained models, and packing a model's checkpoint bundle.

A model's files are found from its row's ``run_key`` through Storage, never from anything in a request.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import Job, Model, User
from app.domain_errors import Conflict, NotFound
from app.storage import Storage
from finetune.checkpoint import META_FILE, MODEL_FILE, load_checkpoint
from finetune.errors import CheckpointError

REPORT_FILE = "report.json"


def get_owned(session: Session, owner: User, model_id: str) -> Model:
    # No id holds a NUL, and PostgreSQL refuses one in a query parameter (a 500 instead of this 404).
    model = session.get(Model, model_id) if "\x00" not in model_id else None
    if model is None or (model.owner_id != owner.id and not owner.is_admin):
        raise NotFound("model", model_id)
    return model


def list_owned(session: Session, owner: User) -> list[Model]:
    query = select(Model).order_by(Model.created_at.desc())
    if not owner.is_admin:
        query = query.where(Model.owner_id == owner.id)
    return list(session.scalars(query))


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
