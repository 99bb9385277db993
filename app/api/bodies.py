"""The bodies of the two endpoints that take files, read with the one reader (``app.api.multipart``) and
handed to the services as plain values.

- A dataset upload: ``multipart/form-data`` with ``archive`` (a .zip), or many ``files`` parts plus
  optional ``paths`` text fields (the i-th ``paths`` value is the i-th file's relative path,
  ``class/img.jpg``: what a browser folder picker gives; without ``paths``, a file part's filename is its
  relative path), and ``name``; or an ``application/zip`` body (``?name=``). Parts are written to numbered
  files in the upload's temp folder as they arrive.
- A predict request: ``images`` parts of a multipart form, or one image as the raw body, in memory (the
  body is capped at a few MiB, and decoding needs the bytes anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from app.api.multipart import FilePart, Form, FormLimits, media_type, read_body, read_form, save_body
from app.errors import ApiError
from app.services import uploads
from app.services.uploads import ReceivedUpload

ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/octet-stream"})
UPLOAD_FIELDS = ("archive", "files")
IMAGE_FIELD = "images"
RAW_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/gif", "application/octet-stream"}
)


# -- dataset uploads --------------------------------------------------------------------------------------


async def read_dataset_upload(request: Request, temp: Path, max_bytes: int, max_files: int) -> ReceivedUpload:
    """The upload in ``request``, its files written under ``temp`` (an empty folder the caller removes)."""
    mime, params = media_type(request)
    if mime in ZIP_TYPES:
        path = temp / "upload.zip"
        if await save_body(request, path, max_bytes) == 0:
            raise ApiError(400, "empty_upload", "the request body is empty: send the dataset zip")
        return uploads.from_archive(request.query_params.get("name"), path)
    if mime != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data (an 'archive' zip or 'files' with 'paths') or an application/zip body",
        )
    incoming = temp / uploads.INCOMING_DIR
    incoming.mkdir()
    # one 'paths' value per file, plus a few others ('name')
    limits = FormLimits(max_bytes, max_files, max_fields=max_files + 100)
    return _upload_from_form(await read_form(request, params, limits, folder=incoming))


def _upload_from_form(form: Form) -> ReceivedUpload:
    unknown = sorted({p.field for p in form.files} - set(UPLOAD_FIELDS))
    if unknown:
        raise ApiError(400, "bad_field", f"unexpected file field(s) {unknown}: use 'archive' or 'files'")
    archives = [p for p in form.files if p.field == "archive"]
    files = [p for p in form.files if p.field == "files"]
    if archives and files:
        raise ApiError(400, "bad_field", "send either one 'archive' or 'files', not both")
    if len(archives) > 1:
        raise ApiError(400, "bad_field", "send one 'archive' per dataset")
    name = form.first("name")
    if archives:
        return uploads.from_archive(name, _path(archives[0]), archives[0].filename)
    if not files:
        raise ApiError(400, "empty_upload", "no files in the upload: send an 'archive' zip or 'files'")
    paths = form.fields.get("paths")
    if paths is not None and len(paths) != len(files):
        raise ApiError(400, "bad_field", f"got {len(paths)} 'paths' for {len(files)} 'files'; send one path per file")
    relative = paths if paths is not None else [f.filename for f in files]
    return uploads.from_files(name, [(rel, _path(f)) for rel, f in zip(relative, files, strict=True)])


def _path(part: FilePart) -> Path:
    assert part.path is not None  # a form read into a folder
    return part.path


# -- predict requests -------------------------------------------------------------------------------------


@dataclass
class ReceivedImage:
    data: bytes
    filename: str | None = None


async def read_images(request: Request, max_bytes: int, max_images: int) -> list[ReceivedImage]:
    """The images of a predict request: ``images`` parts of a multipart form, or one raw image body."""
    mime, params = media_type(request)
    if mime == "multipart/form-data":
        limits = FormLimits(max_bytes, max_images, files_word="images")
        form = await read_form(request, params, limits)
        others = sorted({p.field for p in form.files} - {IMAGE_FIELD})
        if others:
            raise ApiError(400, "bad_field", f"unexpected file field(s) {others}: send images as '{IMAGE_FIELD}'")
        images = [ReceivedImage(p.data, p.filename) for p in form.files]  # text fields carry nothing needed
    elif mime in RAW_IMAGE_TYPES:
        body = await read_body(request, max_bytes)
        images = [ReceivedImage(body)] if body else []
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data with one or more 'images' file parts, or one image as the raw body "
            f"({', '.join(sorted(RAW_IMAGE_TYPES))})",
        )
    if not images:
        raise ApiError(
            400, "no_images", "the request has no image: send 'images' file parts (multipart) or an image body"
        )
    return images
