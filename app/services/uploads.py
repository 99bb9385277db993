"""Receiving a dataset upload: streamed straight to disk, with limits checked as the bytes arrive.

Accepted bodies:

- ``multipart/form-data`` with ``archive`` (a .zip), or many ``files`` parts plus optional ``paths`` text
  fields (the i-th ``paths`` value is the i-th file's relative path, ``class/img.jpg``; what a browser
  folder picker gives). Without ``paths``, a file part's filename is its relative path. ``name`` names
  the dataset.
- ``application/zip`` (or ``application/octet-stream``): the body is the zip.

A user's file name never becomes a path: parts are first written under numbered names in a temporary
folder, each relative path is checked by ``finetune.archive.safe_member_path``, and the file is then
stored under the name ``finetune.archive.StoredNames`` generates (cleaned folder names, a counter for the
file), which also keeps the original name for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import ApiError
from finetune.archive import StoredNames, is_junk, safe_member_path
from finetune.errors import UnsafeArchiveError

_MAX_TEXT_FIELD = 4096
_MAX_HEADER_BYTES = 8192


@dataclass
class UploadLimits:
    max_bytes: int
    max_files: int


@dataclass
class ReceivedUpload:
    name: str | None = None
    archive: Path | None = None
    archive_name: str = "the uploaded zip"  # for messages: the client's file name, never used as a path
    files: list[tuple[PurePosixPath, Path]] = field(default_factory=list)  # (stored path, where it is now)
    names: StoredNames = field(default_factory=StoredNames)  # stored paths and the originals they came from


def too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"upload is larger than the limit of {limit} bytes")


async def receive_upload(request: Request, temp: Path, limits: UploadLimits) -> ReceivedUpload:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise too_large(limits.max_bytes)
    if content_type in (b"application/zip", b"application/x-zip-compressed", b"application/octet-stream"):
        return await _receive_raw_zip(request, temp, limits)
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data (an 'archive' zip or 'files' with 'paths') or an application/zip body",
        )
    return await _receive_multipart(request, temp, limits, params[b"boundary"])


async def _receive_raw_zip(request: Request, temp: Path, limits: UploadLimits) -> ReceivedUpload:
    path = temp / "upload.zip"
    total = 0
    with open(path, "wb") as f:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_bytes:
                raise too_large(limits.max_bytes)
            f.write(chunk)
    if total == 0:
        raise ApiError(400, "empty_upload", "the request body is empty: send the dataset zip")
    return ReceivedUpload(name=request.query_params.get("name"), archive=path)


class _MultipartSink:
    """python-multipart callbacks: each part goes to a numbered file, text fields are kept (small)."""

    def __init__(self, temp: Path, limits: UploadLimits) -> None:
        self.temp = temp
        self.limits = limits
        self.incoming = temp / "incoming"
        self.incoming.mkdir()
        self.total = 0
        self.header_field = b""
        self.header_value = b""
        self.header_bytes = 0
        self.headers: dict[bytes, bytes] = {}
        self.part_name: str | None = None
        self.part_filename: str | None = None
        self.part_file: IO[bytes] | None = None
        self.part_text = bytearray()
        self.file_parts: list[tuple[str, str, Path]] = []  # (field name, filename, path)
        self.text_fields: dict[str, list[str]] = {}
        self.error: ApiError | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def fail(self, error: ApiError) -> None:
        if self.error is None:
            self.error = error

    def on_part_begin(self) -> None:
        self.headers = {}
        self.header_bytes = 0
        self.part_text = bytearray()
        self.part_file = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]
        self._count_header(end - start)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]
        self._count_header(end - start)

    def _count_header(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > _MAX_HEADER_BYTES:
            self.fail(ApiError(400, "bad_multipart", "a multipart part has oversized headers"))

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.part_name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        self.part_filename = filename.decode("utf-8", "replace") if filename is not None else None
        if self.part_filename is not None:
            if len(self.file_parts) >= self.limits.max_files:
                self.fail(ApiError(413, "too_many_files", f"upload has more than {self.limits.max_files} files"))
                return
            path = self.incoming / str(len(self.file_parts))
            self.file_parts.append((self.part_name, self.part_filename, path))
            self.part_file = open(path, "wb")  # noqa: SIM115 - closed in on_part_end or cleanup()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        self.total += n
        if self.total > self.limits.max_bytes:
            self.fail(too_large(self.limits.max_bytes))
            return
        if self.part_file is not None:
            self.part_file.write(data[start:end])
        else:
            self.part_text += data[start:end]
            if len(self.part_text) > _MAX_TEXT_FIELD:
                self.fail(
                    ApiError(413, "too_large", f"form field {self.part_name!r} is longer than {_MAX_TEXT_FIELD} bytes")
                )

    def on_part_end(self) -> None:
        if self.part_file is not None:
            self.part_file.close()
            self.part_file = None
        elif self.part_name is not None:
            values = self.text_fields.setdefault(self.part_name, [])
            if sum(len(v) for v in self.text_fields.values()) > self.limits.max_files + 100:
                self.fail(ApiError(413, "too_many_fields", "upload has too many form fields"))
            values.append(self.part_text.decode("utf-8", "replace"))

    def cleanup(self) -> None:
        if self.part_file is not None:
            self.part_file.close()


async def _receive_multipart(request: Request, temp: Path, limits: UploadLimits, boundary: bytes) -> ReceivedUpload:
    sink = _MultipartSink(temp, limits)
    parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if sink.error is not None:
                raise sink.error
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:  # python-multipart reports malformed bodies with its own exceptions
        raise ApiError(400, "bad_multipart", f"the multipart body is malformed: {e}") from None
    finally:
        sink.cleanup()
    if sink.error is not None:
        raise sink.error
    return _assemble(sink)


def _assemble(sink: _MultipartSink) -> ReceivedUpload:
    names = sink.text_fields.get("name")
    name = names[0] if names else None
    archives = [p for p in sink.file_parts if p[0] == "archive"]
    files = [p for p in sink.file_parts if p[0] == "files"]
    unknown = sorted({p[0] for p in sink.file_parts} - {"archive", "files"})
    if unknown:
        raise ApiError(400, "bad_field", f"unexpected file field(s) {unknown}: use 'archive' or 'files'")
    if archives and files:
        raise ApiError(400, "bad_field", "send either one 'archive' or 'files', not both")
    if len(archives) > 1:
        raise ApiError(400, "bad_field", "send one 'archive' per dataset")
    if archives:
        filename = archives[0][1][-100:] or "the uploaded zip"
        return ReceivedUpload(name=name, archive=archives[0][2], archive_name=filename)
    if not files:
        raise ApiError(400, "empty_upload", "no files in the upload: send an 'archive' zip or 'files'")
    paths = sink.text_fields.get("paths")
    if paths is not None and len(paths) != len(files):
        raise ApiError(400, "bad_field", f"got {len(paths)} 'paths' for {len(files)} 'files'; send one path per file")
    received = ReceivedUpload(name=name)
    seen: set[PurePosixPath] = set()
    for i, (_, filename, path) in enumerate(files):
        raw = paths[i] if paths is not None else filename
        try:
            rel = safe_member_path(raw)
        except UnsafeArchiveError as e:
            raise ApiError(400, "unsafe_path", str(e).replace("archive entry", "file path")) from None
        if not rel.parts or is_junk(rel):
            continue
        if rel in seen:
            raise ApiError(400, "duplicate_path", f"the path {str(rel)!r} appears twice in the upload")
        seen.add(rel)
        try:
            stored = received.names(rel)
        except UnsafeArchiveError as e:
            raise ApiError(400, "unsafe_path", str(e)) from None
        received.files.append((stored, path))
    return received
