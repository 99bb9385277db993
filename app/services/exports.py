"""A model's exports (ONNX, TorchScript, int8 ONNX, each with its parity check) and how it is served:
the precision its owner chose and the runtimes measured for it on each kind of host.

The engine makes and checks the files (``finetune.export``) and measures the runtimes
(``finetune.serving``); both are recorded in the model's run folder. This module reads those records for
the API and the model page, and maps the engine's refusals to API errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.db.tables import Model
from app.domain_errors import BadRequest, Conflict
from app.services import models
from app.storage import Storage
from finetune.errors import CheckpointError, InputError
from finetune.export import (
    FORMATS,
    ONNX_INT8,
    TORCHSCRIPT,
    ExportError,
    ExportResult,
    ParityError,
    export_run,
    parity_summary,
)
from finetune.serving import read_serving

PRECISIONS = ("fp32", "int8")
SUFFIXES = {"onnx": ".onnx", TORCHSCRIPT: ".torchscript.pt", ONNX_INT8: ".int8.onnx"}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise BadRequest(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}", code="bad_format")
    return fmt


def export_model(storage: Storage, model: Model, fmt: str) -> ExportResult:
    """Blocking (seconds: the parity check runs the test split through both networks): the checked export,
    made now unless a verified one of the current checkpoint exists."""
    run_dir = storage.path(model.run_key)
    try:
        return export_run(run_dir, fmt)
    except ParityError as e:
        raise Conflict(str(e), code="export_parity_failed", details={"parity": e.parity}) from None
    except CheckpointError:
        raise models.unavailable(model.id) from None
    except ExportError as e:
        raise Conflict(str(e), code="export_failed") from None
    except InputError as e:  # ONNX packages missing on this server
        raise Conflict(str(e), code="export_unavailable") from None


def download_name(model: Model, fmt: str) -> str:
    return f"{model.arch}-{model.id}{SUFFIXES[fmt]}"


def exports_info(storage: Storage, model: Model) -> dict[str, Any]:
    """Per format, the recorded check of the current checkpoint's export (nothing for formats never made)."""
    run_dir = storage.path(model.run_key)
    out = {}
    for fmt, entry in parity_summary(run_dir).items():
        out[fmt] = {**entry, "download_url": f"/api/v1/models/{model.id}/export?format={fmt}"}
    return out


def serving_info(storage: Storage, model: Model, loaded: dict[str, Any] | None) -> dict[str, Any]:
    """The chosen precision, the runtimes measured per kind of host (the fastest is served), the int8
    accuracy change when it has been measured, and what this API process serves the model with now."""
    run_dir: Path = storage.path(model.run_key)
    exports = exports_info(storage, model)
    recorded = read_serving(run_dir)
    int8 = exports.get(ONNX_INT8)
    return {
        "precision": model.serving_precision,
        "int8_check": int8.get("parity") if int8 else None,
        "measured": recorded.get("devices", {}) if recorded.get("checkpoint") == _current(run_dir) else {},
        "loaded_here": loaded,
    }


def _current(run_dir: Path) -> dict[str, Any] | None:
    from finetune.export import checkpoint_identity

    try:
        return checkpoint_identity(run_dir)
    except CheckpointError:
        return None


def set_precision(session: Session, storage: Storage, model: Model, precision: str) -> None:
    """Serve the model in ``precision``. int8 only once its accuracy change on the test split has been
    measured (and so could be seen): the owner turns it on knowing what it costs."""
    if precision not in PRECISIONS:
        raise BadRequest(f"precision must be one of {', '.join(PRECISIONS)}", code="bad_precision")
    if precision == "int8":
        entry = exports_info(storage, model).get(ONNX_INT8)
        if not entry or not entry.get("accepted"):
            raise Conflict(
                f"measure the int8 model first: POST /api/v1/models/{model.id}/exports?format={ONNX_INT8} "
                "(it reports the accuracy change on the test split), then turn it on",
                code="int8_not_measured",
            )
    model.serving_precision = precision
    session.flush()
