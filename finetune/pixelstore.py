"""The pixel store: decoded uint8 pixels packed into a few large shard files, one store per host.

Every image is decoded once (``finetune.preprocess.stored_pixels``) and its pixels kept under
(sha-256 of the file, stored short side). Training and evaluation read them through memory maps of a few
large shard files, so the number of open files depends on the number of shards (a few dozen at most for a
million images), not on the number of images.

Why a layout of our own (the survey is in the team's data-store notes): we need random access by key over
ragged images (a shuffled batch is 32-256 scattered images), memory maps, a per-host cache that is rebuilt
from the dataset's originals, a byte budget with least-recently-used eviction, and pins for several jobs
reading at once. LitData, MosaicML Streaming and WebDataset are built around iterable, shard-window
streaming with one consumer's eviction (their random access is item by item and slow, by their own
maintainers' account); FFCV's ``.beton`` is the closest in spirit (raw uint8, no upscaling, one map) but is
one file per dataset with no eviction, unmaintained, and needs native libraries to install; DALI is a GPU
pipeline, not a store; zarr/TensorStore want regular shapes. What is left is an offsets table and a few
big files, which is what this module is.

Layout under ``root`` (local disk; never a network filesystem: memory maps, flock and SQLite need local
semantics)::

    catalog.sqlite        entries(sha, side) -> (shard, offset, height, width, original width/height)
                          shards(id, bytes, last_used)
    shards/<id>.px        immutable once in place (a mapped reader never sees a byte change)
    building/<writer>/    a writer's lock file and the shards it is writing or has staged
    pins/<id>.lock        held (flock) for as long as a job or model reads; <id>.json lists its shards
    lock                  flock for commits and eviction (short critical sections)

Shard file: 16-byte header | pixels, each image 64-byte aligned | JSON index | trailer (index offset,
CRC-32 of the index, magic). It describes itself, so a lost catalog is rebuilt from the shards' trailers.

Crash safety: a shard is written under ``building/`` and renamed into ``shards/`` before its catalog rows
are inserted, under the store lock; a crash in between leaves a file without rows, which the next sweep
removes. Eviction deletes the rows first, then the file. A writer's folder is removed by whoever finds its
lock free (its process is gone). A pin's lock is released by the kernel when its process dies, so a
killed job never pins anything for ever.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import shutil
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .checkpoint import fsync_dir
from .errors import InputError
from .tempdb import temp_db

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (sha-256 hex of the file, stored short side)

LAYOUT_VERSION = 1
_HEADER = b"FTPXSHD1" + bytes(8)
_TRAILER = struct.Struct("<QI8s")  # index offset, crc32 of the index, magic
_TRAILER_MAGIC = b"FTPXEND1"
_ALIGN = 64
MIN_SHARD_BYTES = 32 * 1024**2
MAX_SHARD_BYTES = 2 * 1024**3
# A build of N bytes is cut into about this many shards (fewer when small): the open-file count of a job
# stays near this number whatever the dataset size.
SHARDS_PER_BUILD = 32
# The default budget: this share of the disk that holds the store.
DEFAULT_BUDGET_SHARE = 0.2
BUDGET_ENV = "FINETUNE_CACHE_MAX_BYTES"


class StoreFullError(InputError):
    """A dataset's pixels do not fit in the store's byte budget (the message says which setting to raise)."""

    code = "store_full"


@dataclass(frozen=True)
class Entry:
    shard: str
    offset: int
    height: int
    width: int
    orig_width: int
    orig_height: int

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3


def default_budget(root: Path) -> int:
    """``FINETUNE_CACHE_MAX_BYTES`` when set, else a fifth of the disk holding ``root``."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if raw:
        return parse_bytes(raw)
    probe = root
    while not probe.exists():
        probe = probe.parent
    return int(shutil.disk_usage(probe).total * DEFAULT_BUDGET_SHARE)


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_bytes(text: str) -> int:
    """``"5000000"``, ``"500M"``, ``"20G"``, ``"1.5TiB"`` -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    number = t[: len(t) - len(unit)] if unit else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a byte count (e.g. 50000000, 500M, 20G)") from None
    if value < 0:
        raise ValueError(f"a byte count cannot be negative: {text!r}")
    return int(value * _UNITS[unit])


def target_shard_bytes(expected_total: int) -> int:
    return int(min(MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, expected_total / SHARDS_PER_BUILD)))


class _FileLock:
    """An exclusive flock on a file, held by this object's open file (released when it closes or dies)."""

    def __init__(self, path: Path, *, blocking: bool = True) -> None:
        self.path = path
        self._f: IO[bytes] | None = open(path, "a+b")  # noqa: SIM115 - held for the object's life
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            self._f.close()
            self._f = None
            raise

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing the file releases the lock
            self._f = None


def _lock_is_free(path: Path) -> bool:
    """True when no live process holds ``path``'s flock (its owner has exited). Never creates the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the lock if we got it
    return True


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class PixelStore:
    """One host's store of decoded pixels under ``root``, kept within ``max_bytes``."""

    def __init__(self, root: str | Path, *, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes if max_bytes is not None else default_budget(self.root)
        self.shards_dir = self.root / "shards"
        self.building_dir = self.root / "building"
        self.pins_dir = self.root / "pins"
        for d in (self.shards_dir, self.building_dir, self.pins_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._maps: dict[str, mmap.mmap] = {}
        self._maps_lock = threading.Lock()
        self._init_catalog()

    # -- catalog ---------------------------------------------------------------------------------------
    @property
    def _db(self) -> sqlite3.Connection:
        """This thread's catalog connection (sqlite3 connections are not shared between threads)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.root / "catalog.sqlite", timeout=60, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
        return conn

    def _init_catalog(self) -> None:
        fresh = not (self.root / "catalog.sqlite").exists()
        with self.locked():
            db = self._db
            db.execute("PRAGMA journal_mode = WAL")
            db.executescript(
                """
                CREATE TABLE IF NOT EXISTS shards (
                    id TEXT PRIMARY KEY, bytes INTEGER NOT NULL, entries INTEGER NOT NULL,
                    created REAL NOT NULL, last_used REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS entries (
                    sha BLOB NOT NULL, side INTEGER NOT NULL, shard TEXT NOT NULL, offset INTEGER NOT NULL,
                    height INTEGER NOT NULL, width INTEGER NOT NULL,
                    orig_width INTEGER NOT NULL, orig_height INTEGER NOT NULL,
                    PRIMARY KEY (sha, side)) WITHOUT ROWID;
                CREATE INDEX IF NOT EXISTS entries_by_shard ON entries (shard);
                """
            )
            if fresh and any(self.shards_dir.glob("*.px")):
                self._recover_catalog()
            self._sweep()

    def _recover_catalog(self) -> None:
        """A lost catalog: read every shard's own index back in (shards describe themselves)."""
        for path in sorted(self.shards_dir.glob("*.px")):
            try:
                index = read_shard_index(path)
            except (OSError, ValueError) as e:
                log.warning("pixel store: dropping unreadable shard %s (%s)", path.name, e)
                path.unlink(missing_ok=True)
                continue
            self._insert_shard(path.stem, path.stat().st_size, index, len(index))
        log.info("pixel store: catalog rebuilt from %d shard(s)", len(list(self.shards_dir.glob("*.px"))))

    def _insert_shard(self, shard: str, nbytes: int, index: Iterable[Sequence[Any]], count: int) -> None:
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?)", (shard, nbytes, count, now, now))
            db.executemany(
                "INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                ((bytes.fromhex(sha), side, shard, off, h, w, ow, oh) for sha, side, off, h, w, ow, oh in index),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def find(self, sha: str, side: int) -> Entry | None:
        row = self._db.execute(
            "SELECT shard, offset, height, width, orig_width, orig_height FROM entries WHERE sha = ? AND side = ?",
            (bytes.fromhex(sha), side),
        ).fetchone()
        return Entry(*row) if row else None

    def find_for_tier(self, sha: str, tier: int) -> Entry | None:
        """The copy of ``sha`` a job at ``tier`` reads, if stored: the one whose side is min(short, tier)."""
        rows = self._db.execute(
            "SELECT shard, offset, height, width, orig_width, orig_height, side FROM entries WHERE sha = ?",
            (bytes.fromhex(sha),),
        ).fetchall()
        for *fields, side in rows:
            entry = Entry(*fields)
            if side == min(entry.orig_width, entry.orig_height, tier):
                return entry
        return None

    def lookup(self, keys: Iterable[Key]) -> dict[Key, Entry]:
        found: dict[Key, Entry] = {}
        for key in keys:
            entry = self.find(*key)
            if entry is not None:
                found[key] = entry
        return found

    # -- locking, budget and eviction ------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        lock = _FileLock(self.root / "lock")
        try:
            yield
        finally:
            lock.release()

    def usage(self) -> dict[str, int]:
        """Bytes and shards in the store, what live jobs pin, what writers are building, and the budget."""
        db = self._db
        used, shards = db.execute("SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM shards").fetchone()
        entries = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        pinned_ids = self._live_pins(clean=False)
        pinned = 0
        if pinned_ids:
            rows = db.execute("SELECT id, bytes FROM shards").fetchall()
            pinned = sum(b for i, b in rows if i in pinned_ids)
        return {
            "used_bytes": int(used),
            "shards": int(shards),
            "entries": int(entries),
            "pinned_bytes": int(pinned),
            "building_bytes": self._building_bytes(),
            "max_bytes": int(self.max_bytes),
        }

    def _building_bytes(self) -> int:
        total = 0
        for f in self.building_dir.glob("*/*.px"):
            with contextlib.suppress(FileNotFoundError):
                total += f.stat().st_size
        return total

    def _live_pins(self, *, clean: bool) -> set[str]:
        """Shard ids pinned by live readers; with ``clean`` (under the store lock) dead pins are removed."""
        pinned: set[str] = set()
        for lock in self.pins_dir.glob("*.lock"):
            listing = lock.with_suffix(".json")
            if _lock_is_free(lock):
                if clean:
                    listing.unlink(missing_ok=True)
                    lock.unlink(missing_ok=True)
                continue
            try:
                pinned.update(json.loads(listing.read_text()))
            except (FileNotFoundError, ValueError):
                continue  # a pin being created: it lists nothing yet
        return pinned

    def _make_room(self, needed: int, keep: set[str]) -> None:
        """Evict unpinned shards, least recently used first, until the store (shards in place and files
        being built, which include a shard about to be committed) plus ``needed`` fits the budget.
        Called under the store lock. Never evicts a pinned shard or one in ``keep``: pinned sets may
        overshoot the budget (a job alone larger than the budget is refused before it builds anything)."""
        db = self._db
        used = int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM shards").fetchone()[0]) + self._building_bytes()
        if used + needed <= self.max_bytes:
            return
        protected = self._live_pins(clean=True) | keep
        for shard, nbytes in db.execute("SELECT id, bytes FROM shards ORDER BY last_used, created").fetchall():
            if used + needed <= self.max_bytes:
                break
            if shard in protected:
                continue
            self._evict(shard)
            used -= nbytes
        if used + needed > self.max_bytes:
            log.warning(
                "pixel store over its budget: %d bytes used + %d needed > %d (the rest is pinned by running jobs)",
                used,
                needed,
                self.max_bytes,
            )

    def _evict(self, shard: str) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM entries WHERE shard = ?", (shard,))
            db.execute("DELETE FROM shards WHERE id = ?", (shard,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # Rows first, then the file: a row never points at a missing file. A process that still maps the
        # file keeps its pages until it unmaps them (unlinking a mapped file is safe on local Linux).
        (self.shards_dir / f"{shard}.px").unlink(missing_ok=True)
        log.info("pixel store: evicted shard %s", shard)

    def _sweep(self) -> None:
        """Under the store lock: remove what crashed processes left (writers' folders, pins, orphan shards)."""
        for folder in self.building_dir.iterdir():
            if folder.is_dir() and _lock_is_free(folder / "lock"):
                shutil.rmtree(folder, ignore_errors=True)
        self._live_pins(clean=True)
        known = {r[0] for r in self._db.execute("SELECT id FROM shards")}
        for path in self.shards_dir.glob("*.px"):
            if path.stem not in known:
                path.unlink(missing_ok=True)

    def evict_all_unpinned(self) -> int:
        """Drop every shard no live reader pins; returns the bytes freed (``finetune cache clear``)."""
        freed = 0
        with self.locked():
            protected = self._live_pins(clean=True)
            for shard, nbytes in self._db.execute("SELECT id, bytes FROM shards").fetchall():
                if shard not in protected:
                    self._evict(shard)
                    freed += nbytes
        return freed

    # -- writing ---------------------------------------------------------------------------------------
    def writer(self, *, expected_bytes: int = 0, staged: bool = False, pin: Pin | None = None) -> ShardWriter:
        """A writer for new entries. Unstaged, each shard is committed when it is full (and pinned to
        ``pin`` from birth); staged, nothing is visible until ``commit()`` (an upload being checked)."""
        return ShardWriter(self, target_shard_bytes(expected_bytes), staged=staged, pin=pin)

    def _commit_shard(self, path: Path, index: Iterable[Sequence[Any]], pin: Pin | None, *, count: int) -> None:
        """Move a sealed shard into place and make its ``count`` entries (``index``, read once) visible (under
        the store lock)."""
        shard = path.stem
        nbytes = path.stat().st_size
        with self.locked():
            self._make_room(0, pin.shards if pin is not None else set())  # the file is counted as building
            target = self.shards_dir / path.name
            os.replace(path, target)
            fsync_dir(self.shards_dir)
            self._insert_shard(shard, nbytes, index, count)
            if pin is not None:
                pin._add_locked({shard})

    # -- reading ---------------------------------------------------------------------------------------
    def pin(self) -> Pin:
        return Pin(self)

    def array(self, entry: Entry) -> np.ndarray:
        """The stored (height, width, 3) uint8 pixels of ``entry``: a read-only view of its shard's map."""
        mm = self._map(entry.shard)
        n = entry.nbytes
        return np.frombuffer(mm, dtype=np.uint8, count=n, offset=entry.offset).reshape(entry.height, entry.width, 3)

    def advise(self, entries: Iterable[Entry]) -> None:
        """Ask the kernel to read these entries' pages ahead (several times faster than faulting them in
        one page at a time when the data is not in the page cache)."""
        page = mmap.PAGESIZE
        for e in entries:
            mm = self._map(e.shard)
            start = e.offset - e.offset % page
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_WILLNEED, start, e.offset + e.nbytes - start)

    def _map(self, shard: str) -> mmap.mmap:
        mm = self._maps.get(shard)
        if mm is None:
            with self._maps_lock:
                mm = self._maps.get(shard)
                if mm is None:
                    with open(self.shards_dir / f"{shard}.px", "rb") as f:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    self._maps[shard] = mm
        return mm

    def release_maps(self, keep: set[str] | None = None) -> None:
        """Forget the maps of shards not in ``keep`` (they close once no array views them any more)."""
        with self._maps_lock:
            for shard in [s for s in self._maps if keep is None or s not in keep]:
                del self._maps[shard]

    def close(self) -> None:
        self.release_maps()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class Pin:
    """A reader's claim on shards: none of them is evicted while the pin is held (``with store.pin() as p``).

    The claim is a flock the kernel drops when the process dies, plus a list of shard ids beside it."""

    def __init__(self, store: PixelStore) -> None:
        self.store = store
        self.id = uuid.uuid4().hex
        self.shards: set[str] = set()
        self._lock_path = store.pins_dir / f"{self.id}.lock"
        self._list_path = store.pins_dir / f"{self.id}.json"
        self._lock: _FileLock | None = _FileLock(self._lock_path)

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _add_locked(self, shards: set[str]) -> None:
        """Add ``shards`` (caller holds the store lock, so no eviction runs in between)."""
        if shards <= self.shards:
            return
        self.shards |= shards
        _atomic_write(self._list_path, json.dumps(sorted(self.shards)).encode())
        self._touch(shards)

    def _touch(self, shards: set[str]) -> None:
        db = self.store._db
        db.execute("BEGIN IMMEDIATE")
        db.executemany("UPDATE shards SET last_used = ? WHERE id = ?", ((time.time(), s) for s in shards))
        db.execute("COMMIT")

    def claim(self, keys: Sequence[Key]) -> tuple[dict[Key, Entry], list[Key]]:
        """Pin the shards holding ``keys``: (entries found, keys missing). Found entries stay readable for
        as long as the pin is held; missing ones must be (re)built by the caller."""
        with self.store.locked():
            found = self.store.lookup(keys)
            self._add_locked({e.shard for e in found.values()})
        return found, [k for k in keys if k not in found]

    def release(self) -> None:
        if self._lock is None:
            return
        lock, self._lock = self._lock, None
        try:
            if self.shards:
                with contextlib.suppress(sqlite3.Error):
                    self._touch(self.shards)  # least recently used counts from the end of the read
            self._list_path.unlink(missing_ok=True)
            self._lock_path.unlink(missing_ok=True)
        finally:
            lock.release()  # whatever happened above: a pin whose lock is free protects nothing


class ShardWriter:
    """Appends decoded images to shard files under ``building/`` (thread-safe).

    What it has written (each image's key and place, until its shard is committed) is kept in a temporary
    SQLite file, not in memory: a writer that stages a million images holds what one of a hundred holds.

    Use as a context manager: leaving it normally commits what is left, an exception aborts."""

    def __init__(self, store: PixelStore, target_bytes: int, *, staged: bool, pin: Pin | None) -> None:
        self.store = store
        self.target_bytes = target_bytes
        self.staged = staged
        self.pin = pin
        self.folder = store.building_dir / uuid.uuid4().hex
        self.folder.mkdir()
        self._lock: _FileLock | None = _FileLock(self.folder / "lock")
        self._mutex = threading.Lock()
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._shard_no = 0  # the shard being written; its entries are those of the index with this number
        self._index: sqlite3.Connection | None = None
        self._offset = 0
        self._sealed: list[tuple[Path, int]] = []  # staged shards: (path, shard number)
        self.bytes_written = 0
        self.entries_written = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def add(self, sha: str, side: int, pixels: np.ndarray, original: tuple[int, int]) -> None:
        h, w = pixels.shape[:2]
        data = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        with self._mutex:
            if self._file is None:
                self._open()
            assert self._file is not None and self._index is not None
            pad = -self._offset % _ALIGN
            added = self._index.execute(
                "INSERT OR IGNORE INTO idx VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (self._shard_no, bytes.fromhex(sha), side, self._offset + pad, h, w, original[0], original[1]),
            ).rowcount
            if not added:  # written already (a duplicate image)
                return
            if pad:
                self._file.write(bytes(pad))
                self._offset += pad
            self._file.write(data)
            self._offset += len(data)
            self.bytes_written += len(data)
            self.entries_written += 1
            if self._offset >= self.target_bytes:
                self._seal()

    def _open(self) -> None:
        if self._index is None:
            self._index = temp_db()
            self._index.execute(
                "CREATE TABLE idx (shard INTEGER, sha BLOB, side INTEGER, offset INTEGER, height INTEGER, "
                "width INTEGER, orig_width INTEGER, orig_height INTEGER, UNIQUE (sha, side))"
            )
            self._index.execute("CREATE INDEX idx_shard ON idx (shard)")
        self._path = self.folder / f"{uuid.uuid4().hex}.px"
        self._file = open(self._path, "wb")  # noqa: SIM115 - closed by _seal or abort
        self._file.write(_HEADER)
        self._offset = len(_HEADER)
        self._shard_no += 1

    def _entries(self, shard_no: int) -> Iterator[list[Any]]:
        """The index of one shard, [[sha, side, offset, height, width, orig w, orig h], ...] in the order added."""
        assert self._index is not None
        rows = self._index.execute("SELECT * FROM idx WHERE shard = ? ORDER BY rowid", (shard_no,))
        while batch := rows.fetchmany(4096):
            for _, sha, *rest in batch:
                yield [sha.hex(), *rest]

    def _seal(self) -> None:
        """Finish the current file (index, trailer, fsync); commit it unless staged."""
        assert self._file is not None and self._path is not None
        crc = 0
        count = 0
        for i, entry in enumerate(self._entries(self._shard_no)):  # the index, as JSON, written as it is read
            chunk = (b"[" if i == 0 else b",") + json.dumps(entry, separators=(",", ":")).encode()
            self._file.write(chunk)
            crc = zlib.crc32(chunk, crc)
            count += 1
        end = b"]" if count else b"[]"
        self._file.write(end)
        crc = zlib.crc32(end, crc)
        self._file.write(_TRAILER.pack(self._offset, crc, _TRAILER_MAGIC))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        path = self._path
        self._file, self._path = None, None
        if self.staged:
            self._sealed.append((path, self._shard_no))
        else:
            self._commit(path, self._shard_no)

    def _commit(self, path: Path, shard_no: int) -> None:
        assert self._index is not None
        (count,) = self._index.execute("SELECT COUNT(*) FROM idx WHERE shard = ?", (shard_no,)).fetchone()
        self.store._commit_shard(path, self._entries(shard_no), self.pin, count=count)

    def commit(self) -> None:
        """Make everything written visible in the store (staged shards included)."""
        with self._mutex:
            if self._file is not None:
                self._seal()
            for path, shard_no in self._sealed:
                self._commit(path, shard_no)
            self._sealed = []
            self._finish()

    def abort(self) -> None:
        """Drop everything written: nothing of it stays on disk."""
        with self._mutex:
            file, self._file = self._file, None
            self._sealed = []
            try:
                if file is not None:
                    file.close()
            finally:
                self._finish()

    def _finish(self) -> None:
        lock, self._lock = self._lock, None
        index, self._index = self._index, None
        try:
            if index is not None:
                index.close()
            shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            if lock is not None:
                lock.release()  # a folder left behind with a free lock is swept by the next store opened


def read_shard_index(path: Path) -> list[list[Any]]:
    """A shard's own index, checked (magic, CRC): [[sha, side, offset, height, width, orig w, orig h], ...]."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(_HEADER) + _TRAILER.size or f.read(len(_HEADER))[:8] != _HEADER[:8]:
            raise ValueError("not a pixel store shard")
        f.seek(size - _TRAILER.size)
        index_offset, crc, magic = _TRAILER.unpack(f.read(_TRAILER.size))
        if magic != _TRAILER_MAGIC or not len(_HEADER) <= index_offset <= size - _TRAILER.size:
            raise ValueError("shard trailer is damaged")
        f.seek(index_offset)
        data = f.read(size - _TRAILER.size - index_offset)
    if zlib.crc32(data) != crc:
        raise ValueError("shard index checksum mismatch")
    index: list[list[Any]] = json.loads(data)
    for _sha, _side, off, h, w, _ow, _oh in index:
        if off + h * w * 3 > index_offset:
            raise ValueError("shard index points past the pixels")
    return index
