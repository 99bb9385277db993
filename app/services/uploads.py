"""A received dataset upload, as plain values: a zip on disk, or files on disk with the relative paths
their client gave them. ``app.api.bodies`` reads the request into one; ``app.services.datasets`` checks it.

A user's file name never becomes a path: each relative path is checked by
``finetune.archive.safe_member_path`` and the file is stored under the name ``finetune.archive.StoredNames``
generates (cleaned folder names, a counter for the file), which also keeps the original name for the report
and refuses two folders whose names clean up to the same name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from app.domain_errors import BadRequest
from finetune.archive import StoredNames, is_junk, safe_member_path
from finetune.errors import UnsafeArchiveError

INCOMING_DIR = "incoming"  # the upload's temp folder holds the received parts here until they are arranged


@dataclass
class ReceivedUpload:
    name: str | None = None
    archive: Path | None = None
    archive_name: str = "the uploaded zip"  # for messages: the client's file name, never used as a path
    files: list[tuple[PurePosixPath, Path]] = field(default_factory=list)  # (stored path, where it is now)
    names: StoredNames = field(default_factory=StoredNames)  # stored paths and the originals they came from


def from_archive(name: str | None, archive: Path, filename: str | None = None) -> ReceivedUpload:
    return ReceivedUpload(name=name, archive=archive, archive_name=(filename or "")[-100:] or "the uploaded zip")


def from_files(name: str | None, files: list[tuple[str, Path]]) -> ReceivedUpload:
    """``files``: (the client's relative path, where the bytes are). Paths are checked and renamed here;
    OS junk and empty paths are dropped. ``BadRequest`` for an unsafe or repeated path."""
    received = ReceivedUpload(name=name)
    seen: set[PurePosixPath] = set()
    for raw, path in files:
        try:
            rel = safe_member_path(raw)
        except UnsafeArchiveError as e:
            raise BadRequest(str(e).replace("archive entry", "file path"), code="unsafe_path") from None
        if not rel.parts or is_junk(rel):
            continue
        if rel in seen:
            raise BadRequest(f"the path {str(rel)!r} appears twice in the upload", code="duplicate_path")
        seen.add(rel)
        try:
            stored = received.names(rel)  # a FolderNameClashError (an engine input error) passes through
        except UnsafeArchiveError as e:
            raise BadRequest(str(e), code="unsafe_path") from None
        received.files.append((stored, path))
    return received
