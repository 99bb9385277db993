"""/api/v1/datasets: upload (zip or folder), list, get (with thumbnails, or the check's progress), the file
list page by page, the full report (streamed), delete."""

from __future__ import annotations

import asyncio
import shutil
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.api.bodies import read_dataset_upload
from app.api.deps import CurrentUser, SessionDep, SettingsDep, StorageDep
from app.api.responses import thumbnail_response
from app.api.types import UtcDateTime
from app.db.tables import Dataset
from app.domain_errors import BadRequest, Conflict
from app.services import datasets as svc
from app.services.dataset_checks import LEASE_SECONDS, DatasetChecks
from finetune.config import TrainConfig
from finetune.defaults import DataFacts, choose_defaults

router = APIRouter(prefix="/datasets", tags=["datasets"])

MAX_NAME = 200


class DatasetOut(BaseModel):
    id: str
    name: str
    source: str
    num_images: int
    num_classes: int
    classes: list[str]
    size_bytes: int
    created_at: UtcDateTime
    status: Literal["checking", "ready", "refused"]
    progress: dict[str, Any] | None = None  # while checking: {"phase", "done", "total"}
    error: dict[str, Any] | None = None  # when refused: {"code", "message"}
    report: dict[str, Any]
    thumbnails: dict[str, list[str]] | None = None


class FilesPage(BaseModel):
    total: int  # files matching the filters
    offset: int
    limit: int
    files: list[dict[str, Any]]  # {"index", "path", "class", "split", "stored"?}


def clean_name(raw: str | None) -> str:
    """A display name: control characters (NUL among them, which PostgreSQL refuses) become spaces."""
    return "".join(c if c.isprintable() else " " for c in raw or "").strip()[:MAX_NAME]


def to_out(dataset: Dataset, thumbnails: dict[str, list[int]] | None = None) -> DatasetOut:
    urls = None
    if thumbnails is not None:
        urls = {c: [f"/api/v1/datasets/{dataset.id}/thumbnails/{i}" for i in idx] for c, idx in thumbnails.items()}
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        source=dataset.source,
        num_images=dataset.num_images,
        num_classes=dataset.num_classes,
        classes=dataset.classes,
        size_bytes=dataset.size_bytes,
        created_at=dataset.created_at,
        status=dataset.status,
        progress=dataset.progress,
        error=dataset.error,
        report=dataset.report,
        thumbnails=urls,
    )


def wants_async(request: Request) -> bool:
    """RFC 7240: ``Prefer: respond-async`` asks for 202 as soon as the body has arrived."""
    return any(p.strip().lower() == "respond-async" for p in request.headers.get("prefer", "").split(","))


@router.post(
    "",
    status_code=201,
    summary="Upload a dataset",
    description="A multipart form with `archive` (a .zip of class folders) or many `files` with matching `paths` "
    "(relative paths such as `cats/1.jpg`, as a folder picker sends them), and an optional `name`; or a raw "
    "`application/zip` body (`?name=`). Every image is checked; the report lists classes, counts per split, "
    "skipped files with reasons and warnings. The request waits for the check (201 or a 4xx naming the "
    "problem); with `Prefer: respond-async` it answers 202 as soon as the body has arrived, and the dataset "
    "(`Location`) shows `status` `checking` with `progress` until it is `ready` or `refused` (with `error`).",
    responses={
        202: {"description": "`Prefer: respond-async`: received; the check runs (poll the dataset)"},
        429: {"description": "`rate_limited`: too many uploads by this user (see `Retry-After`)"},
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "archive": {"type": "string", "format": "binary"},
                            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "paths": {"type": "array", "items": {"type": "string"}},
                        },
                    }
                },
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
            },
            "required": True,
        }
    },
)
async def create_dataset(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    user: CurrentUser,
) -> DatasetOut:
    request.app.state.rate_limits.uploads.take(user.id, "upload")  # before a byte of the body is read
    temp = storage.new_temp_dir("upload")
    handed_over = False
    try:
        received = await read_dataset_upload(request, temp, settings.max_upload_bytes, settings.max_upload_files)
        name = clean_name(received.name) or f"dataset {datetime.now():%Y-%m-%d %H:%M}"
        source = "zip" if received.archive else "files"
        respond_async = wants_async(request)
        dataset = svc.create_pending(session, user, name, source, LEASE_SECONDS)
        session.commit()
        checks: DatasetChecks = request.app.state.dataset_checks
        future = checks.submit(dataset.id, received, temp, keep_refused=respond_async)
        handed_over = True  # the check removes the temp folder when it ends
        if respond_async:
            response.status_code = 202
            response.headers["Location"] = f"{request.url.path.rstrip('/')}/{dataset.id}"
            return to_out(dataset)
        ready = await asyncio.wrap_future(future)  # a refusal raises here and is answered as such
        return to_out(ready, await run_in_threadpool(svc.thumbnail_indices, storage, ready))
    finally:
        if not handed_over:
            shutil.rmtree(temp, ignore_errors=True)


@router.get("", summary="List datasets")
def list_datasets(session: SessionDep, user: CurrentUser) -> list[DatasetOut]:
    return [to_out(d) for d in svc.list_owned(session, user)]


@router.get(
    "/{dataset_id}",
    summary="Get a dataset: its report and thumbnail URLs per class, or the check's progress while it runs",
)
def get_dataset(
    dataset_id: str, request: Request, session: SessionDep, storage: StorageDep, user: CurrentUser
) -> DatasetOut:
    dataset = svc.get_owned(session, user, dataset_id)
    if dataset.status == "checking" and request.app.state.dataset_checks.sweep():
        session.refresh(dataset)  # its checker had died: it is refused now
    if dataset.status != "ready":
        return to_out(dataset)
    return to_out(dataset, svc.thumbnail_indices(storage, dataset))


@router.get(
    "/{dataset_id}/report",
    summary="The full dataset report, including every file and its split (streamed)",
    response_model=dict[str, Any],
    responses={200: {"content": {"application/json": {}}}},
)
def get_report(dataset_id: str, session: SessionDep, storage: StorageDep, user: CurrentUser) -> StreamingResponse:
    dataset = _ready(svc.get_owned(session, user, dataset_id))
    return StreamingResponse(svc.report_chunks(storage, dataset), media_type="application/json")


@router.get("/{dataset_id}/files", summary="The dataset's files, a page at a time, optionally one class or split")
def get_files(
    dataset_id: str,
    session: SessionDep,
    storage: StorageDep,
    user: CurrentUser,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    class_name: Annotated[str | None, Query(alias="class", max_length=300)] = None,
    split: Literal["train", "val", "test"] | None = None,
) -> FilesPage:
    dataset = _ready(svc.get_owned(session, user, dataset_id))
    return FilesPage(**svc.files_page(storage, dataset, offset, limit, class_name, split))


class SuggestedDefaults(BaseModel):
    model: str
    weights: str
    values: dict[str, Any]  # setting -> value, for a form to pre-fill
    choices: list[dict[str, Any]]  # [{setting, value, reason}]


_ARCHITECTURES: Any = Literal[TrainConfig.__dataclass_fields__["model"].metadata["choices"]]


@router.get(
    "/{dataset_id}/defaults",
    summary="The settings a job on this dataset would choose itself, with the reason for each",
    description="From the dataset's image sizes and images per class, the architecture and the weights "
    "(no weight file is read): image size, crop scale, flips and label smoothing. A job that leaves them "
    "open chooses the same from the split it trains on.",
)
def get_defaults(
    dataset_id: str,
    session: SessionDep,
    user: CurrentUser,
    model: _ARCHITECTURES = "resnet18",
    weights: Literal["imagenet", "none"] = "imagenet",
) -> SuggestedDefaults:
    dataset = _ready(svc.get_owned(session, user, dataset_id))
    if model == "lenet" and weights == "imagenet":
        raise BadRequest("lenet has no ImageNet weights: use weights=none", code="invalid_weights")
    choices = choose_defaults(model, weights, DataFacts.from_report(dataset.report or {}))
    return SuggestedDefaults(
        model=model,
        weights=weights,
        values={c.setting: c.value for c in choices},
        choices=[c.to_dict() for c in choices],
    )


def _ready(dataset: Dataset) -> Dataset:
    if dataset.status != "ready":
        raise Conflict(f"dataset {dataset.id} is {dataset.status}: it has no files", code="dataset_not_ready")
    return dataset


@router.get(
    "/{dataset_id}/thumbnails/{index}",
    response_class=Response,
    summary="A small JPEG of one image",
    responses={200: {"content": {"image/jpeg": {}}}},
)
def get_thumbnail(dataset_id: str, index: int, session: SessionDep, storage: StorageDep, user: CurrentUser) -> Response:
    dataset = svc.get_owned(session, user, dataset_id)
    data = svc.thumbnail(storage, dataset, index)
    return thumbnail_response(data, f"thumbnail-{dataset.id}-{index}.jpg")


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset (409 while a job uses it)")
def delete_dataset(dataset_id: str, session: SessionDep, storage: StorageDep, user: CurrentUser) -> Response:
    key = svc.delete_dataset(session, svc.get_owned(session, user, dataset_id))
    session.commit()  # the row goes first: files of a row that still exists are never removed
    storage.delete(key)
    return Response(status_code=204)
