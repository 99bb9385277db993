"""Checking uploads in the background: a few threads of the API process, each check's progress and lease
written to its dataset row.

A check decodes every image (minutes for a few hundred thousand photos), so it never runs on the event loop
and the client need not hold its request open for it: ``POST /datasets`` with ``Prefer: respond-async``
answers 202 at once and the row shows ``progress``; without it the request waits for the verdict. The check
renews its row's lease on the database's clock; if the process dies, another API process (or this one at
its next start) finds the lease lapsed and marks the upload ``refused`` as interrupted.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db.tables import Dataset
from app.domain_errors import Conflict, ServiceError
from app.services import datasets as svc
from app.services.uploads import ReceivedUpload
from app.settings import Settings
from app.storage import Storage
from finetune.errors import InputError
from finetune.pixelstore import PixelStore

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
RENEW_EVERY = 10.0  # a lease is renewed at least this often, progress or not (a long extraction, say)
PROGRESS_EVERY = 0.5


class DatasetChecks:
    """The pool that checks uploads (``max_concurrent_checks`` at a time; more wait their turn, ``queued``)."""

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], storage: Storage, store: PixelStore
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.storage = storage
        self.store = store
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def submit(self, dataset_id: str, received: ReceivedUpload, temp: Path, *, keep_refused: bool) -> Future[Dataset]:
        """Check ``received`` (its files under ``temp``, which the check removes) for the row ``dataset_id``.
        The future gives the ready row, or raises the refusal (``keep_refused``: the row records it)."""
        with self._pool_lock:
            if self._pool is None:  # made on first use, and again after a shutdown (the app restarted)
                workers = max(1, self.settings.max_concurrent_checks)
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="dataset-check")
            return self._pool.submit(self._check, dataset_id, received, temp, keep_refused)

    def shutdown(self) -> None:
        """Finish the checks that are running; those still waiting stay ``checking`` until their lease lapses."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def sweep(self) -> int:
        with self.sessions.begin() as session:
            return svc.sweep_interrupted(session, self.storage)

    def _check(self, dataset_id: str, received: ReceivedUpload, temp: Path, keep_refused: bool) -> Dataset:
        lease = _Lease(self.sessions, dataset_id)
        try:
            checked = svc.check_upload(received, temp, self.settings, self.store, progress=lease.progress)
            try:
                with self.sessions() as session:
                    dataset = svc.accept(session, self.storage, dataset_id, checked)
                    if dataset is None:
                        raise Conflict(f"upload {dataset_id} was deleted or interrupted while it was checked")
                    # The pixels join the store before the row says ready, so a job started at once finds them
                    # rather than decoding every image again. Should the commit below fail, they stay only as
                    # unreferenced cache, which the store's budget evicts like any other.
                    checked.keep_pixels()
                    try:
                        session.commit()
                    except BaseException:
                        self.storage.delete(dataset.storage_key)
                        raise
                return dataset
            finally:
                checked.drop_pixels()  # a no-op once kept
        except (InputError, ServiceError) as e:
            self._refuse(dataset_id, getattr(e, "code", "bad_dataset"), _message(e), keep_refused)
            raise
        except Exception as e:
            log.exception("checking upload %s failed", dataset_id)
            self._refuse(dataset_id, "check_failed", f"the check failed: {type(e).__name__}", keep_refused)
            raise
        finally:
            lease.stop()
            shutil.rmtree(temp, ignore_errors=True)

    def _refuse(self, dataset_id: str, code: str, message: str, keep_record: bool) -> None:
        try:
            with self.sessions.begin() as session:
                svc.refuse(session, dataset_id, code, message, keep_record=keep_record)
        except Exception:
            log.exception("could not record the refusal of upload %s", dataset_id)


def _message(e: Exception) -> str:
    return e.message if isinstance(e, ServiceError) else str(e)


class _Lease:
    """Writes a check's progress to its row (a few times a second at most) and renews its lease, from a
    timer thread as well, so a phase that reports nothing for a while keeps it."""

    def __init__(self, sessions: sessionmaker[Session], dataset_id: str) -> None:
        self.sessions = sessions
        self.dataset_id = dataset_id
        self._latest: dict[str, Any] | None = None
        self._written = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_forever, name=f"lease-{dataset_id[:8]}", daemon=True)
        self._thread.start()

    def progress(self, phase: str, done: int, total: int) -> None:
        with self._lock:
            self._latest = {"phase": phase, "done": done, "total": total}
            due = time.monotonic() - self._written >= PROGRESS_EVERY or (total and done == total)
        if due:
            self._write()

    def _write(self) -> None:
        with self._lock:
            progress, self._written = self._latest, time.monotonic()
        try:
            with self.sessions.begin() as session:
                svc.renew(session, self.dataset_id, LEASE_SECONDS, progress)
        except Exception:  # progress is best effort; the lease is renewed again shortly
            log.exception("could not record the progress of upload %s", self.dataset_id)

    def _renew_forever(self) -> None:
        while not self._stop.wait(RENEW_EVERY):
            self._write()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
