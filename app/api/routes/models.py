"""/api/v1/models: list, get (metrics, per class, confusion matrix, calibration, training config, exports and
serving), change the "unknown" threshold, the misclassified test images, download the checkpoint bundle, export (ONNX, TorchScript, int8
ONNX, each parity-checked), choose the serving precision, delete. Prediction is in ``predict.py``."""

from __future__ import annotations

import asyncio
import shutil
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from app.api.deps import CurrentUser, SessionDep, StorageDep
from app.api.responses import thumbnail_response
from app.api.types import UtcDateTime
from app.db.tables import Model
from app.errors import ApiError
from app.services import exports as export_svc
from app.services import models as svc
from app.serving.cache import ModelCache
from app.storage import Storage

router = APIRouter(prefix="/models", tags=["models"])

BUNDLE_NAME = "model.zip"


async def get_model_cache(request: Request) -> ModelCache:  # async: no threadpool hop to read app state
    return request.app.state.model_cache


ModelCacheDep = Annotated[ModelCache, Depends(get_model_cache)]


class ClassMetrics(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    class_name: str = Field(alias="class")
    precision: float
    recall: float
    f1: float
    support: int


class SplitMetrics(BaseModel):
    """One split's evaluation of the best checkpoint (``count`` 0 and nothing else for an empty split)."""

    model_config = ConfigDict(extra="allow")

    count: int
    loss: float | None = None
    top1: float | None = None
    top5: float | None = Field(default=None, description="only with 5 classes or more")
    macro_f1: float | None = None
    per_class: list[ClassMetrics] = Field(default_factory=list)
    confusion_matrix: list[list[int]] = Field(
        default_factory=list, description="rows: the true class, columns: the predicted class (order of `classes`)"
    )


class ModelSummary(BaseModel):
    id: str
    name: str
    arch: str
    num_classes: int
    classes: list[str]
    job_id: str | None
    size_bytes: int
    created_at: UtcDateTime
    best_epoch: int | None = Field(default=None, description="the epoch of the checkpoint that is served")
    val_top1: float | None = None
    test_top1: float | None = None


class ParityCheck(BaseModel):
    """An export run side by side with the PyTorch model on the model's own test split (or a fixed sample)."""

    model_config = ConfigDict(extra="allow")

    split: str = Field(description="`test`, `val` when the run has no test split, or `random` when its images are gone")
    images: int
    top1_agreement: float = Field(description="share of images whose top-1 label is the same as PyTorch's")
    max_abs_prob_diff: float = Field(description="largest difference of any class probability from PyTorch's")
    reference_top1: float | None = Field(None, description="PyTorch's top-1 accuracy on those images")
    export_top1: float | None = Field(None, description="the export's top-1 accuracy on those images")
    accuracy_change_points: float | None = Field(None, description="export minus PyTorch, in percentage points")
    thresholds: dict[str, float] | None = Field(None, description="what a float32 export must meet (none for int8)")
    passed: bool


class ExportOut(BaseModel):
    accepted: bool = Field(description="false: the export was refused (it disagreed with PyTorch); no file is kept")
    created_at: str
    bytes: int | None = None
    sha256: str | None = None
    parity: ParityCheck
    download_url: str


class ServingOut(BaseModel):
    precision: Literal["fp32", "int8"] = Field(description="what the owner chose (int8: ONNX Runtime, quantized)")
    int8_check: ParityCheck | None = Field(
        None, description="the int8 model against PyTorch, with its accuracy change (once measured)"
    )
    measured: dict[str, Any] = Field(
        default_factory=dict,
        description="per kind of host and precision: images/s of each runtime measured and the winner served",
    )
    loaded_here: dict[str, Any] | None = Field(None, description="what this API process serves the model with now")


class ThresholdOut(BaseModel):
    value: float | None = Field(
        description="what predict uses: below it, `label` is `unknown` (null: every image gets its top label)"
    )
    source: Literal["owner", "validation", "none"] = Field(
        description="`owner`: set with PATCH; `validation`: chosen after training for `target_precision`"
    )
    chosen: float | None = Field(None, description="the threshold chosen on the validation split")
    target_precision: float | None = Field(None, description="the precision the chosen threshold reaches on val")


class ModelOut(ModelSummary):
    val: SplitMetrics | None = None
    test: SplitMetrics | None = None
    calibration: dict[str, Any] | None = Field(
        None,
        description="temperature scaling fitted on val: `temperature`, per split `ece_before`/`ece_after` with "
        "reliability-diagram bins (`reliability_before`/`_after`), and the val `coverage` curve (per threshold: "
        "share of images answered and their accuracy)",
    )
    threshold: ThresholdOut | None = None
    config: dict[str, Any] = Field(description="the training settings of the job that made the model")
    download_url: str
    predict_url: str
    exports: dict[str, ExportOut] = Field(default_factory=dict, description="per format, its checked export")
    serving: ServingOut | None = None


class ServingIn(BaseModel):
    precision: Literal["fp32", "int8"]


class ModelPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="predict answers `unknown` below this top probability; 0: never; null: back to the "
        "threshold chosen on validation",
    )


def threshold_out(model: Model) -> ThresholdOut:
    return ThresholdOut.model_validate(svc.threshold_info(model))


def _split(evaluation: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = evaluation.get(name)
    return value if isinstance(value, dict) and "count" in value else None


def summary_out(model: Model) -> ModelSummary:
    return ModelSummary(**_summary_fields(model))


def _summary_fields(model: Model) -> dict[str, Any]:
    evaluation = model.evaluation or {}
    val, test = _split(evaluation, "val"), _split(evaluation, "test")
    epoch = evaluation.get("epoch")
    return {
        "id": model.id,
        "name": model.name,
        "arch": model.arch,
        "num_classes": model.num_classes,
        "classes": model.classes,
        "job_id": model.job_id,
        "size_bytes": model.size_bytes,
        "created_at": model.created_at,
        "best_epoch": epoch if isinstance(epoch, int) else None,
        "val_top1": val.get("top1") if val else None,
        "test_top1": test.get("top1") if test else None,
    }


def model_out(model: Model, storage: Storage | None = None, loaded: dict[str, Any] | None = None) -> ModelOut:
    evaluation = model.evaluation or {}
    val, test = _split(evaluation, "val"), _split(evaluation, "test")
    extra: dict[str, Any] = {}
    if storage is not None:
        extra["exports"] = export_svc.exports_info(storage, model)
        extra["serving"] = export_svc.serving_info(storage, model, loaded)
    return ModelOut(
        **_summary_fields(model),
        val=SplitMetrics.model_validate(val) if val else None,
        test=SplitMetrics.model_validate(test) if test else None,
        calibration=evaluation.get("calibration") if isinstance(evaluation.get("calibration"), dict) else None,
        threshold=threshold_out(model),
        config=model.config,
        download_url=f"/api/v1/models/{model.id}/download",
        predict_url=f"/api/v1/models/{model.id}/predict",
        **extra,
    )


@router.get("", summary="List models")
def list_models(session: SessionDep, user: CurrentUser) -> list[ModelSummary]:
    return [summary_out(m) for m in svc.list_owned(session, user)]


@router.get(
    "/{model_id}",
    summary="Get a model: classes, val/test metrics, per-class metrics, confusion matrix, training config",
)
def get_model(
    model_id: str, session: SessionDep, storage: StorageDep, user: CurrentUser, cache: ModelCacheDep
) -> ModelOut:
    entry = cache.loaded(model_id)
    return model_out(svc.get_owned(session, user, model_id), storage, entry.info() if entry else None)


@router.patch(
    "/{model_id}",
    summary="Change a model's settings: its `unknown` threshold",
    description='`{"threshold": 0.7}`: predict answers `unknown` when the top (calibrated) probability is '
    "below 0.7; `0` never answers `unknown`; `null` goes back to the threshold chosen on validation. Every API "
    "process applies it within a second.",
)
def patch_model(
    model_id: str, body: ModelPatch, request: Request, session: SessionDep, storage: StorageDep, user: CurrentUser
) -> ModelOut:
    model = svc.get_owned(session, user, model_id)
    if "threshold" not in body.model_fields_set:
        raise ApiError(422, "nothing_to_change", 'give the setting to change, e.g. {"threshold": 0.7}')
    svc.set_threshold(session, model, body.threshold)
    session.commit()
    request.app.state.predict_lookups.models.discard(model_id)
    return model_out(model, storage)


class MisclassifiedItem(BaseModel):
    index: int = Field(description="its place in the model's list (the thumbnail's address)")
    path: str = Field(description="the file, relative to the dataset's folder")
    probability: float = Field(description="the (calibrated) probability the model gave the wrong class")
    thumbnail_url: str


class Confusion(BaseModel):
    true: str
    true_index: int
    predicted: str
    predicted_index: int
    count: int = Field(description="test images of class `true` the model called `predicted`")
    items: list[MisclassifiedItem] = Field(description="from `offset`, at most `limit`, most confident first")


class MisclassifiedOut(BaseModel):
    available: bool = Field(description="false for models trained before the list was recorded")
    split: str
    images: int = Field(description="images in the split")
    total: int = Field(description="images the model got wrong")
    recorded: int = Field(description="of those, how many the list keeps (the first 10,000)")
    offset: int
    limit: int
    confusions: list[Confusion] = Field(description="the most frequent confusion first")


@router.get(
    "/{model_id}/misclassified",
    summary="The test images the model got wrong, grouped by confusion (true -> predicted)",
    description="`true` and `predicted` (class indices) keep one confusion-matrix cell, or one row or column. "
    "Each group lists its images from `offset`, at most `limit`, most confident first.",
)
def get_misclassified(
    model_id: str,
    session: SessionDep,
    storage: StorageDep,
    user: CurrentUser,
    true: Annotated[int | None, Query(ge=0, description="the true class's index")] = None,
    predicted: Annotated[int | None, Query(ge=0, description="the predicted class's index")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 12,
) -> MisclassifiedOut:
    model = svc.get_owned(session, user, model_id)
    gallery = svc.misclassified_gallery(storage, model, true=true, predicted=predicted, offset=offset, limit=limit)
    return MisclassifiedOut.model_validate(gallery)


@router.get(
    "/{model_id}/misclassified/{index}/thumbnail",
    response_class=Response,
    summary="A small JPEG of one misclassified test image",
    responses={200: {"content": {"image/jpeg": {}}}},
)
def get_misclassified_thumbnail(
    model_id: str, index: int, session: SessionDep, storage: StorageDep, user: CurrentUser
) -> Response:
    model = svc.get_owned(session, user, model_id)
    data = svc.misclassified_thumbnail(storage, model, index)
    return thumbnail_response(data, f"misclassified-{model.id}-{index}.jpg")


# One export at a time per API process: each runs the test split through two networks on every core.
_export_slot = asyncio.Semaphore(1)

FormatQuery = Annotated[
    str, Query(description="`onnx`, `torchscript` or `onnx-int8`", examples=["onnx"], max_length=20)
]


async def _checked_export(model_id: str, fmt: str, request: Request, user: Any) -> tuple[Model, Any]:
    storage: Storage = request.app.state.storage
    export_svc.check_format(fmt)

    def read() -> Model:
        with request.app.state.sessions() as session:
            model = svc.get_owned(session, user, model_id)
            session.expunge(model)
            return model

    model = await run_in_threadpool(read)
    async with _export_slot:
        result = await run_in_threadpool(export_svc.export_model, storage, model, fmt)
    return model, result


@router.get(
    "/{model_id}/export",
    response_class=FileResponse,
    summary="Export the model as one self-contained file (ONNX, TorchScript or int8 ONNX), parity-checked",
    description="The network with its preprocessing (the input is the uint8 centre crop, N x crop x crop x 3 RGB; "
    "normalisation is inside) and softmax; class names and preprocessing in the file's metadata. Made on the "
    "first request (seconds: the test split is run through PyTorch and the export) and kept for the checkpoint. "
    "A float32 export that disagrees with PyTorch (top-1 agreement below 100% or a probability off by more "
    "than 1e-4) is refused with 409 `export_parity_failed`. The check's figures are in `X-Parity` and on the model.",
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def export_model(
    model_id: str, request: Request, user: CurrentUser, format: FormatQuery = "onnx"
) -> FileResponse:
    model, result = await _checked_export(model_id, format, request, user)
    p = result.parity
    return FileResponse(
        result.path,
        media_type="application/octet-stream",
        filename=export_svc.download_name(model, format),
        headers={
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
            "X-Parity": f"top1_agreement={p['top1_agreement']:.6f}; max_abs_prob_diff={p['max_abs_prob_diff']:.3g}; "
            f"split={p['split']}; images={p['images']}",
        },
    )


@router.post(
    "/{model_id}/exports",
    summary="Make (or re-read) one export and its parity check, without downloading it",
    description="What the model page's int8 button calls: `format=onnx-int8` measures the int8 model's accuracy "
    "change on the test split, which must be known before `PUT /serving` turns int8 on.",
)
async def make_export(model_id: str, request: Request, user: CurrentUser, format: FormatQuery = "onnx") -> ExportOut:
    model, _ = await _checked_export(model_id, format, request, user)
    storage: Storage = request.app.state.storage
    return ExportOut.model_validate(export_svc.exports_info(storage, model)[format])


@router.put(
    "/{model_id}/serving",
    summary="Serve the model in float32 or int8",
    description="int8 (ONNX Runtime, statically quantized, calibrated on the validation images) needs its "
    "accuracy change on the test split measured first (`POST /exports?format=onnx-int8`, shown on the model): "
    "otherwise 409 `int8_not_measured`. Every API process serves the new precision within a second.",
)
async def set_serving(
    model_id: str, body: ServingIn, request: Request, user: CurrentUser, cache: ModelCacheDep
) -> ServingOut:
    storage: Storage = request.app.state.storage

    def update() -> Model:
        with request.app.state.sessions() as session:
            model = svc.get_owned(session, user, model_id)
            export_svc.set_precision(session, storage, model, body.precision)
            session.commit()
            session.refresh(model)
            session.expunge(model)
            return model

    model = await run_in_threadpool(update)
    request.app.state.predict_lookups.models.discard(model_id)
    await cache.evict(model_id)  # reloaded at the next request, in the new precision
    return ServingOut.model_validate(export_svc.serving_info(storage, model, None))


@router.get(
    "/{model_id}/download",
    response_class=FileResponse,
    summary="Download the model: a zip of model.safetensors, meta.json and report.json",
    description="The best checkpoint's weights (safetensors) and metadata (architecture, classes, "
    "preprocessing), and the run's evaluation report. `finetune predict` and `Predictor.from_run` load the "
    "unzipped folder directly.",
    responses={200: {"content": {"application/zip": {}}}},
)
def download_model(model_id: str, session: SessionDep, storage: StorageDep, user: CurrentUser) -> FileResponse:
    model = svc.get_owned(session, user, model_id)
    files = svc.bundle_files(storage, model)
    temp = storage.new_temp_dir("download")
    try:
        svc.write_bundle(files, temp / BUNDLE_NAME)
    except FileNotFoundError:  # the checkpoint was removed while we packed it
        shutil.rmtree(temp, ignore_errors=True)
        raise svc.unavailable(model.id) from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return FileResponse(
        temp / BUNDLE_NAME,
        media_type="application/zip",
        filename=f"{model.arch}-{model.id}.zip",  # built from the row, never the user-chosen name
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store"},
        background=BackgroundTask(shutil.rmtree, temp, ignore_errors=True),
    )


@router.delete(
    "/{model_id}",
    status_code=204,
    summary="Delete a model (its run folder too, unless its job still exists)",
)
async def delete_model(
    model_id: str, request: Request, session: SessionDep, storage: StorageDep, user: CurrentUser, cache: ModelCacheDep
) -> Response:
    def remove_row() -> str | None:
        key = svc.delete_model(session, svc.get_owned(session, user, model_id))
        session.commit()  # the row goes first: files of a row that still exists are never removed
        return key

    key = await run_in_threadpool(remove_row)
    request.app.state.predict_lookups.models.discard(model_id)
    await cache.evict(model_id)
    if key:
        await run_in_threadpool(storage.delete, key)
    return Response(status_code=204)
