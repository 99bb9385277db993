"""Models: reading and deleting trained models, packing a model's checkpoint bundle, and turning a
predict request body into image bytes.

A model's files are found from its row's ``run_key`` through Storage, never from anything in a request.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.tables import Job, Model, User
from app.errors import ApiError, not_found
from app.storage import Storage
from finetune.checkpoint import META_FILE, MODEL_FILE, load_checkpoint
from finetune.errors import CheckpointError

REPORT_FILE = "report.json"
IMAGE_FIELD = "images"
RAW_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/gif", "application/octet-stream"}
)
_MAX_PART_HEADER_BYTES = 8192


def get_owned(session: Session, owner: User, model_id: str) -> Model:
    # No id holds a NUL, and PostgreSQL refuses one in a query parameter (a 500 instead of this 404).
    model = session.get(Model, model_id) if "\x00" not in model_id else None
    if model is None or (model.owner_id != owner.id and not owner.is_admin):
        raise not_found("model", model_id)
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


def unavailable(model: Model) -> ApiError:
    return ApiError(409, "model_unavailable", f"the files of model {model.id} are missing or incomplete on this server")


def bundle_files(storage: Storage, model: Model) -> list[tuple[str, Path]]:
    """(name in the zip, file) for the download: the best checkpoint's weights and metadata, and the
    run's evaluation report."""
    run_dir = storage.fetch_once(model.run_key)
    try:
        ckpt = load_checkpoint(run_dir, "best")
    except CheckpointError:
        raise unavailable(model) from None
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


# -- predict request bodies -------------------------------------------------------------------------------


@dataclass
class ReceivedImage:
    data: bytes
    filename: str | None = None


def too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the request is larger than the limit of {limit} bytes")


def too_many(limit: int) -> ApiError:
    return ApiError(413, "too_many_images", f"send at most {limit} images per request")


async def receive_images(request: Request, max_bytes: int, max_images: int) -> list[ReceivedImage]:
    """The images of a predict request: ``images`` parts of a multipart form, or one raw image body.

    The body is read into memory (it is capped at ``max_bytes``, and decoding needs the bytes anyway),
    counting as it arrives so an oversized body is refused without being read to the end."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    mime = content_type.decode("latin-1").lower()
    multipart = mime == "multipart/form-data"
    if not multipart and mime not in RAW_IMAGE_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data with one or more 'images' file parts, or one image as the raw body "
            f"({', '.join(sorted(RAW_IMAGE_TYPES))})",
        )
    if multipart and b"boundary" not in params:
        raise ApiError(400, "bad_multipart", "the multipart content type has no boundary")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large(max_bytes)
    if not multipart:
        if not body:
            raise no_images()
        return [ReceivedImage(bytes(body))]
    # Parsing up to max_bytes is CPU work: off the event loop.
    return await run_in_threadpool(_parse_multipart, bytes(body), params[b"boundary"], max_images)


def no_images() -> ApiError:
    return ApiError(400, "no_images", "the request has no image: send 'images' file parts (multipart) or an image body")


class _ImageParts:
    """python-multipart callbacks collecting file parts in memory (the body is already capped)."""

    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self.header_field = b""
        self.header_value = b""
        self.header_bytes = 0
        self.headers: dict[bytes, bytes] = {}
        self.name = ""
        self.filename: str | None = None
        self.data = bytearray()
        self.images: list[ReceivedImage] = []
        self.other_files: set[str] = set()
        self.error: ApiError | None = None

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self.headers, self.header_bytes, self.data = {}, 0, bytearray()
        self.name, self.filename = "", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]
        self.header_bytes += end - start

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]
        self.header_bytes += end - start

    def on_header_end(self) -> None:
        if self.header_bytes > _MAX_PART_HEADER_BYTES and self.error is None:
            self.error = ApiError(400, "bad_multipart", "a multipart part has oversized headers")
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        self.filename = filename.decode("utf-8", "replace") if filename is not None else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.filename is not None and self.name == IMAGE_FIELD:
            self.data += data[start:end]

    def on_part_end(self) -> None:
        if self.filename is None:
            return  # text fields carry nothing a prediction needs
        if self.name != IMAGE_FIELD:
            self.other_files.add(self.name)
            return
        if len(self.images) >= self.max_images and self.error is None:
            self.error = too_many(self.max_images)
        self.images.append(ReceivedImage(bytes(self.data), self.filename))
        self.data = bytearray()


def _parse_multipart(body: bytes, boundary: bytes, max_images: int) -> list[ReceivedImage]:
    sink = _ImageParts(max_images)
    parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except Exception as e:  # python-multipart reports malformed bodies with its own exceptions
        raise ApiError(400, "bad_multipart", f"the multipart body is malformed: {e}") from None
    if sink.error is not None:
        raise sink.error
    if sink.other_files:
        raise ApiError(
            400, "bad_field", f"unexpected file field(s) {sorted(sink.other_files)}: send images as '{IMAGE_FIELD}'"
        )
    if not sink.images:
        raise no_images()
    return sink.images
