"""/api/v1/models: list, get (metrics, per class, confusion matrix, training config), download the
checkpoint bundle, delete. Prediction is in ``predict.py``."""

from __future__ import annotations

import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from app.api.deps import CurrentUser, SessionDep, StorageDep
from app.api.types import UtcDateTime
from app.db.tables import Model
from app.services import models as svc
from app.serving.cache import ModelCache

router = APIRouter(prefix="/models", tags=["models"])

BUNDLE_NAME = "model.zip"


def get_model_cache(request: Request) -> ModelCache:
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


class ModelOut(ModelSummary):
    val: SplitMetrics | None = None
    test: SplitMetrics | None = None
    config: dict[str, Any] = Field(description="the training settings of the job that made the model")
    download_url: str
    predict_url: str


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


def model_out(model: Model) -> ModelOut:
    evaluation = model.evaluation or {}
    val, test = _split(evaluation, "val"), _split(evaluation, "test")
    return ModelOut(
        **_summary_fields(model),
        val=SplitMetrics.model_validate(val) if val else None,
        test=SplitMetrics.model_validate(test) if test else None,
        config=model.config,
        download_url=f"/api/v1/models/{model.id}/download",
        predict_url=f"/api/v1/models/{model.id}/predict",
    )


@router.get("", summary="List models")
def list_models(session: SessionDep, user: CurrentUser) -> list[ModelSummary]:
    return [summary_out(m) for m in svc.list_owned(session, user)]


@router.get(
    "/{model_id}",
    summary="Get a model: classes, val/test metrics, per-class metrics, confusion matrix, training config",
)
def get_model(model_id: str, session: SessionDep, user: CurrentUser) -> ModelOut:
    return model_out(svc.get_owned(session, user, model_id))


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
    model_id: str, session: SessionDep, storage: StorageDep, user: CurrentUser, cache: ModelCacheDep
) -> Response:
    def remove_row() -> str | None:
        key = svc.delete_model(session, svc.get_owned(session, user, model_id))
        session.commit()  # the row goes first: files of a row that still exists are never removed
        return key

    key = await run_in_threadpool(remove_row)
    await cache.evict(model_id)
    if key:
        await run_in_threadpool(storage.delete, key)
    return Response(status_code=204)
