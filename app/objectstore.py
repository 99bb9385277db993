"""An S3-compatible bucket as the place datasets, run folders and models live (``FINETUNE_STORAGE_BACKEND=s3``).

The engine and the service work on local files; with object storage each host keeps a local copy of what it
reads under its own cache folder, and a folder is *fetched* (the objects missing or changed locally are
downloaded) before it is read and *published* (the files missing or changed remotely are uploaded, then the
ones deleted locally are removed) after it is written. Keys are the storage keys (``datasets/<id>/...``,
``runs/<id>/...``) under an optional prefix.

Why boto3: the reference S3 client (every S3-compatible server — MinIO, Ceph RGW, R2 — is tested against
it), managed multipart transfers with retries, and a synchronous API that suits the worker's threads;
s3fs bridges to an async client pinned to narrow botocore versions, and obstore's API is still pre-1.0.

Run folders hold two symlinks (``last``, ``best``); S3 has none, so a link is stored as a small object
``<name>.symlink`` whose body is the link's target, and made a link again when fetched. Files are uploaded
before links, and links before stale objects are removed: a reader fetching meanwhile finds ``last``
pointing at a checkpoint whose files are all there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SYMLINK_SUFFIX = ".symlink"
# Below boto3's multipart threshold an object's ETag is the MD5 of its bytes: compared to spot changes in
# files rewritten in place (run.json). Larger files (weights) are written once under a new name: size will do.
MD5_LIMIT = 8 * 1024 * 1024
# Transfers run this many at a time: a dataset is many small objects, and each request waits mostly on the
# network (boto3's clients are thread-safe).
PARALLEL_TRANSFERS = 16


def _each(action: Callable[[Any], None], items: Iterable[Any]) -> None:
    with ThreadPoolExecutor(PARALLEL_TRANSFERS) as pool:
        for _ in pool.map(action, items):
            pass


class ObjectStore:
    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None
    ) -> None:
        import boto3  # only with the S3 backend

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)

    def _key(self, key: str) -> str:
        return self.prefix + key.strip("/")

    def listing(self, key: str) -> dict[str, tuple[int, str]]:
        """{path relative to ``key``: (size, etag)} of every object under the folder ``key``."""
        base = self._key(key) + "/"
        found: dict[str, tuple[int, str]] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                found[obj["Key"][len(base) :]] = (int(obj["Size"]), str(obj["ETag"]).strip('"'))
        return found

    def exists(self, key: str) -> bool:
        """An object ``key``, a link ``key``, or a folder ``key`` with anything in it."""
        full = self._key(key)
        for candidate in (full, full + SYMLINK_SUFFIX):
            try:
                self.client.head_object(Bucket=self.bucket, Key=candidate)
                return True
            except self.client.exceptions.ClientError:
                pass
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full + "/", MaxKeys=1)
        return bool(page.get("KeyCount", 0))

    def size(self, key: str) -> int:
        return sum(size for name, (size, _) in self.listing(key).items() if not name.endswith(SYMLINK_SUFFIX))

    def delete(self, key: str) -> None:
        names = list(self.listing(key))
        base = self._key(key) + "/"
        for i in range(0, len(names), 1000):
            batch = [{"Key": base + n} for n in names[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def publish(self, local: Path, key: str) -> None:
        """Mirror the local folder ``local`` to ``key``: changed files, then links, then removals."""
        remote = self.listing(key)
        files, links = _walk(local)
        base = self._key(key) + "/"
        changed = [(rel, path) for rel, path in files.items() if not _same(path, remote.get(rel))]
        _each(lambda item: self.client.upload_file(str(item[1]), self.bucket, base + item[0]), changed)
        for rel, target in links.items():
            name = rel + SYMLINK_SUFFIX
            if remote.get(name, (0, ""))[1] != hashlib.md5(target.encode()).hexdigest():
                self.client.put_object(Bucket=self.bucket, Key=base + name, Body=target.encode())
        stale = [n for n in remote if n not in files and n.removesuffix(SYMLINK_SUFFIX) not in links]
        for i in range(0, len(stale), 1000):
            batch = [{"Key": base + n} for n in stale[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def fetch(self, key: str, local: Path, *, immutable: bool = False) -> bool:
        """Bring the local copy of the folder ``key`` up to date; False when the store has nothing there.
        ``immutable``: its files never change once written (a dataset): a local file of the right size is
        taken as is, without reading it to compare checksums."""
        remote = self.listing(key)
        if not remote:
            return False
        base = self._key(key) + "/"

        def download(rel: str) -> None:
            path = local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
            self.client.download_file(self.bucket, base + rel, str(tmp))
            os.replace(tmp, path)

        missing = [
            rel
            for rel, (size, etag) in remote.items()
            if not rel.endswith(SYMLINK_SUFFIX) and not _same(local / rel, (size, "-" if immutable else etag))
        ]
        _each(download, missing)
        for rel in remote:
            if rel.endswith(SYMLINK_SUFFIX):
                target = self.client.get_object(Bucket=self.bucket, Key=base + rel)["Body"].read().decode()
                _link(local / rel.removesuffix(SYMLINK_SUFFIX), target)
        return True

    def fetch_file(self, key: str, local: Path) -> bool:
        """One object (a report, a thumbnail's image) to its local copy; False when it does not exist."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.ClientError:
            return False
        if not _same(local, (int(head["ContentLength"]), str(head["ETag"]).strip('"'))):
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
            self.client.download_file(self.bucket, self._key(key), str(tmp))
            os.replace(tmp, local)
        return True


def _walk(root: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """(files, links) under ``root`` by relative POSIX path; temporary files (dot-names) are left out."""
    files: dict[str, Path] = {}
    links: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts):
                continue
            if path.is_symlink():
                links[rel] = os.readlink(path)
            elif name in filenames:
                files[rel] = path
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink() and not d.startswith(".")]
    return files, links


def _same(path: Path, remote: tuple[int, str] | None) -> bool:
    if remote is None or not path.is_file() or path.is_symlink():
        return False
    size, etag = remote
    if path.stat().st_size != size:
        return False
    if size >= MD5_LIMIT or "-" in etag:  # multipart uploads' ETags are not an MD5 ("-": size is enough)
        return True
    return hashlib.md5(path.read_bytes()).hexdigest() == etag


def _link(path: Path, target: str) -> None:
    if path.is_symlink() and os.readlink(path) == target:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(target, tmp)
    os.replace(tmp, path)
