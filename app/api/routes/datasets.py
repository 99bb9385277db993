"""/api/v1/datasets: upload (zip or folder), list, get (with thumbnails), delete."""

from __future__ import annotations

import shutil
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from app.api.bodies import read_dataset_upload
from app.api.deps import CurrentUser, SessionDep, SettingsDep, StorageDep
from app.api.types import UtcDateTime
from app.db.tables import Dataset
from app.services import datasets as svc

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
    report: dict[str, Any]
    thumbnails: dict[str, list[str]] | None = None


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
        report=dataset.report,
        thumbnails=urls,
    )


@router.post(
    "",
    status_code=201,
    summary="Upload a dataset",
    description="A multipart form with `archive` (a .zip of class folders) or many `files` with matching `paths` "
    "(relative paths such as `cats/1.jpg`, as a folder picker sends them), and an optional `name`; or a raw "
    "`application/zip` body (`?name=`). Every image is checked; the report lists classes, counts per split, "
    "skipped files with reasons and warnings.",
    responses={429: {"description": "`rate_limited`: too many uploads by this user (see `Retry-After`)"}},
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
    request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep, user: CurrentUser
) -> DatasetOut:
    request.app.state.rate_limits.uploads.take(user.id, "upload")  # before a byte of the body is read
    temp = storage.new_temp_dir("upload")
    try:
        received = await read_dataset_upload(request, temp, settings.max_upload_bytes, settings.max_upload_files)
        checked = await run_in_threadpool(svc.check_upload, received, temp, settings)
        name = clean_name(received.name) or f"dataset {datetime.now():%Y-%m-%d %H:%M}"
        dataset = svc.store_dataset(session, storage, user, name, "zip" if received.archive else "files", checked)
        try:
            session.commit()
        except BaseException:
            storage.delete(storage.dataset_key(dataset.id))
            raise
        return to_out(dataset, await run_in_threadpool(svc.thumbnail_indices, storage, dataset))
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@router.get("", summary="List datasets")
def list_datasets(session: SessionDep, user: CurrentUser) -> list[DatasetOut]:
    return [to_out(d) for d in svc.list_owned(session, user)]


@router.get("/{dataset_id}", summary="Get a dataset with its report and thumbnail URLs per class")
def get_dataset(dataset_id: str, session: SessionDep, storage: StorageDep, user: CurrentUser) -> DatasetOut:
    dataset = svc.get_owned(session, user, dataset_id)
    return to_out(dataset, svc.thumbnail_indices(storage, dataset))


@router.get("/{dataset_id}/report", summary="The full dataset report, including every file and its split")
def get_report(dataset_id: str, session: SessionDep, storage: StorageDep, user: CurrentUser) -> dict[str, Any]:
    return svc.full_report(storage, svc.get_owned(session, user, dataset_id))


@router.get(
    "/{dataset_id}/thumbnails/{index}",
    response_class=Response,
    summary="A small JPEG of one image",
    responses={200: {"content": {"image/jpeg": {}}}},
)
def get_thumbnail(dataset_id: str, index: int, session: SessionDep, storage: StorageDep, user: CurrentUser) -> Response:
    dataset = svc.get_owned(session, user, dataset_id)
    data = svc.thumbnail(storage, dataset, index)
    return Response(
        data,
        media_type="image/jpeg",
        headers={
            "Cache-Control": "private, max-age=86400",
            "X-Content-Type-Options": "nosniff",
            # Built from the row's id, never a user's name; <img> still shows it, a direct visit saves it.
            "Content-Disposition": f'attachment; filename="thumbnail-{dataset.id}-{index}.jpg"',
        },
    )


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset (409 while a job uses it)")
def delete_dataset(dataset_id: str, session: SessionDep, storage: StorageDep, user: CurrentUser) -> Response:
    key = svc.delete_dataset(session, svc.get_owned(session, user, dataset_id))
    session.commit()  # the row goes first: files of a row that still exists are never removed
    storage.delete(key)
    return Response(status_code=204)
