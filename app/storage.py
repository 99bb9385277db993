"""File storage under the data folder, behind one small interface.

Rows in the database hold *keys* (relative paths such as ``datasets/<id>``); only this module turns a key
into a path. A shared filesystem or an object store can later sit behind the same methods. User-supplied
names never become paths here: keys are built from ids.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        """The absolute path of ``key``; refuses keys that would leave the data folder."""
        p = (self.root / key).resolve()
        if not p.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} is outside the data folder")
        return p

    @staticmethod
    def dataset_key(dataset_id: str) -> str:
        return f"datasets/{dataset_id}"

    @staticmethod
    def run_key(job_id: str) -> str:
        return f"runs/{job_id}"

    def new_temp_dir(self, purpose: str) -> Path:
        """A fresh folder under ``tmp/`` for work in progress (uploads being received and checked)."""
        p = self.root / "tmp" / f"{purpose}-{uuid.uuid4().hex}"
        p.mkdir(parents=True)
        return p

    def commit_dir(self, temp: Path, key: str) -> Path:
        """Move a finished temp folder into place under ``key`` (a rename: atomic on one filesystem)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp.rename(target)
        return target

    def delete(self, key: str) -> None:
        """Remove ``key`` (renamed aside first, so a crash mid-delete leaves nothing half there)."""
        p = self.path(key)
        if not p.exists():
            return
        trash = self.root / "tmp" / f"trash-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        p.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def size(self, key: str) -> int:
        p = self.path(key)
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())

    def clean_temp(self) -> None:
        """Drop leftovers of uploads interrupted by a crash (called at startup)."""
        tmp = self.root / "tmp"
        if tmp.is_dir():
            for p in tmp.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
