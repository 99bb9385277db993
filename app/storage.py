"""File storage under the data folder, behind one small interface.

Rows in the database hold *keys* (relative paths such as ``datasets/<id>``); only this module turns a key
into a path. User-supplied names never become paths here: keys are built from ids.

The data folder may be shared by several hosts (and mounted at a different path on each): nothing stored
in it names an absolute path, and ``tmp/`` entries belong to the process that made them. Each entry's name
carries its owner (a random id per process start), the owner refreshes its entries' times while it lives,
and a process cleans only its own entries and those nobody has refreshed for ``stale_seconds`` (a crashed
process's leftovers) — never another live process's upload in flight.

With object storage (``FINETUNE_STORAGE_BACKEND=s3``) the bucket holds the datasets, run folders and
models, and ``root`` is this host's local copy of what it reads (under its cache folder): ``fetch`` before
reading a folder, ``publish`` after writing one. On the filesystem both are no-ops.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.objectstore import ObjectStore
    from app.settings import Settings

log = logging.getLogger(__name__)

# One per process start: the owner of this process's tmp/ entries.
PROCESS_TOKEN = uuid.uuid4().hex[:16]
DEFAULT_STALE_SECONDS = 3600.0
TOUCH_INTERVAL_SECONDS = 60.0


class Storage:
    def __init__(
        self, root: Path, *, stale_seconds: float = DEFAULT_STALE_SECONDS, store: ObjectStore | None = None
    ) -> None:
        self.root = root.resolve()
        self.stale_seconds = stale_seconds
        self.store = store
        self._mine: set[Path] = set()
        self._mine_lock = threading.Lock()
        self._fetched: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        if settings.storage_backend == "filesystem":
            return cls(settings.data_dir, stale_seconds=settings.temp_stale_seconds)
        from app.objectstore import ObjectStore

        assert settings.s3_bucket, "FINETUNE_S3_BUCKET is required with the s3 storage backend"
        store = ObjectStore(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region)
        return cls(settings.cache_dir / "objects", stale_seconds=settings.temp_stale_seconds, store=store)

    # -- object storage (no-ops on the filesystem) ---------------------------------------------------------
    def fetch(self, key: str, *, immutable: bool = False) -> Path:
        """The local folder of ``key``, brought up to date from the object store first (``immutable``: its
        files never change once written, so sizes are compared, not contents)."""
        if self.store is not None:
            self.store.fetch(key, self.path(key), immutable=immutable)
        return self.path(key)

    def fetch_once(self, key: str) -> Path:
        """``fetch`` for folders that never change once written (a model's run): once per process."""
        if self.store is not None and key not in self._fetched:
            self.store.fetch(key, self.path(key))
            self._fetched.add(key)
        return self.path(key)

    def fetch_file(self, key: str) -> Path:
        if self.store is not None:
            self.store.fetch_file(key, self.path(key))
        return self.path(key)

    def publish(self, key: str) -> None:
        """Send the local folder of ``key`` to the object store (what changed; what was deleted goes)."""
        if self.store is not None:
            self.store.publish(self.path(key), key)

    def path(self, key: str) -> Path:
        """The absolute path of ``key``; refuses keys that would leave the data folder."""
        p = (self.root / key).resolve()
        if not p.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} is outside the data folder")
        return p

    def exists(self, key: str) -> bool:
        if self.store is not None:
            return self.store.exists(key)
        return self.path(key).exists()

    @staticmethod
    def dataset_key(dataset_id: str) -> str:
        return f"datasets/{dataset_id}"

    @staticmethod
    def run_key(job_id: str) -> str:
        return f"runs/{job_id}"

    # -- tmp/ ---------------------------------------------------------------------------------------------
    def new_temp_dir(self, purpose: str) -> Path:
        """A fresh folder under ``tmp/`` for work in progress (uploads being received and checked), owned by
        this process."""
        p = self.root / "tmp" / f"{purpose}-{PROCESS_TOKEN}-{uuid.uuid4().hex}"
        p.mkdir(parents=True)
        with self._mine_lock:
            self._mine.add(p)
        return p

    def commit_dir(self, temp: Path, key: str) -> Path:
        """Move a finished temp folder into place under ``key`` (a rename: atomic on one filesystem)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp.rename(target)
        return target

    def delete(self, key: str) -> None:
        """Remove ``key`` (renamed aside first, so a crash mid-delete leaves nothing half there)."""
        if self.store is not None:
            self.store.delete(key)
            self._fetched.discard(key)
        p = self.path(key)
        if not p.exists():
            return
        trash = self.root / "tmp" / f"trash-{PROCESS_TOKEN}-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        p.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def size(self, key: str) -> int:
        if self.store is not None:
            return self.store.size(key)
        p = self.path(key)
        if p.is_file():
            return p.stat().st_size
        return tree_bytes(p)

    def touch_own_temp(self) -> None:
        """Refresh the times of this process's live tmp/ entries (so no other process takes them for stale)."""
        with self._mine_lock:
            mine = list(self._mine)
        for p in mine:
            try:
                os.utime(p)
            except FileNotFoundError:  # committed or removed by now
                with self._mine_lock:
                    self._mine.discard(p)

    def keep_temp_alive(self, stop: threading.Event, interval: float = TOUCH_INTERVAL_SECONDS) -> threading.Thread:
        """Refresh this process's tmp/ entries every ``interval`` seconds until ``stop`` is set."""

        def loop() -> None:
            while not stop.wait(interval):
                self.touch_own_temp()

        thread = threading.Thread(target=loop, name="tmp-keepalive", daemon=True)
        thread.start()
        return thread

    def clean_temp(self) -> list[str]:
        """Remove this process's tmp/ entries and other processes' stale ones (a crash's leftovers); returns
        the names removed. Called at start and at shutdown; never touches another live process's entries."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return []
        removed = []
        now = time.time()
        for p in tmp.iterdir():
            try:
                own = f"-{PROCESS_TOKEN}-" in p.name
                if not own and now - p.lstat().st_mtime < self.stale_seconds:
                    continue
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                removed.append(p.name)
            except FileNotFoundError:  # another process cleaned it meanwhile
                continue
        if removed:
            log.info("removed %d tmp/ entries (this process's, or stale)", len(removed))
        return removed


def tree_bytes(folder: Path) -> int:
    """The bytes of the regular files under ``folder`` (links not followed), read a folder at a time
    (``Path.rglob`` remembers every path it yields: memory that grows with the files)."""
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total
