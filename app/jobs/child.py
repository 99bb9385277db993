"""The job process: ``python -m app.jobs.child JOB_ID ATTEMPT PARENT_PID``.

It runs the engine for one job attempt and writes what the engine reports into the database: epoch
metrics as rows, coarse progress a few times a second, the final status and the model row. Every write is
fenced on the attempt, so if this process is stale its writes are refused and it stops. It is the only
process that touches CUDA; it dies with the worker that started it.

It works in the data folder, and gives the engine paths relative to it: the run's files (run.json, the
checkpoints' metadata) then name no host's mount point, and a run started on one host resumes on another
that mounts the shared folder elsewhere. Host-local settings (this host's cache and weights folders) are
passed again on every resume, never read back from the run.

SIGUSR1 (its worker drains) stops it at the next batch boundary with exit code 75 and nothing recorded: the
worker puts the job back in the queue, and it continues from its last checkpoint elsewhere.

A job on several devices runs one such process per device under torchrun (``app.jobs.ranks``). Rank 0 is
the one described above; the other ranks join the process group, wait for rank 0 to fetch the run's files,
train, and write nothing: no row, no file, no status (``follow``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete

from app.db import session_scope
from app.db.tables import Dataset, Job, JobMetric, JobStatus, Model
from app.jobs import state
from app.jobs.lifetime import die_with_parent
from app.jobs.settings_env import settings_from_env
from app.services.datasets import dataset_images_folder, split_file_for
from app.settings import Settings
from app.storage import Storage
from finetune.config import TrainConfig
from finetune.errors import Cancelled, InputError
from finetune.events import Event

if TYPE_CHECKING:
    from finetune.train import RunResult

log = logging.getLogger("app.jobs.child")


class Superseded(Exception):
    """This attempt no longer holds the job (it was recovered and claimed again)."""


EXIT_DRAINED = 75  # same as app.jobs.worker.EXIT_DRAINED (not imported: the worker module is not needed here)
# Rank 0 of a job on several devices lost another rank (a collective failed): it records nothing, and its
# launcher (app.jobs.ranks) reports how that rank ended, so the worker retries a killed rank's job.
EXIT_PEER_LOST = 76


class JobReporter:
    """Engine events -> database rows, throttled; also the engine's stop flag (cancel, lost, or drain)."""

    def __init__(
        self, settings: Settings, job_id: str, attempt: int, publish: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.publish = publish or (lambda: None)  # the run folder to the object store (when there is one)
        self.url = settings.db_url
        self.job_id = job_id
        self.attempt = attempt
        self.total_epochs = 1
        self.choices: dict[str, Any] = {}
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._stop = False
        self.draining = False

    def drain(self) -> None:
        """Stop at the next batch boundary because the worker drains (a signal handler: no I/O here)."""
        self.draining = True

    def _update(self, **values: Any) -> None:
        with session_scope(self.url) as s:
            if not state.fenced_update(s, self.job_id, self.attempt, **values):
                self._stop = True

    def should_stop(self) -> bool:
        if self.draining:
            return True
        now = time.monotonic()
        if not self._stop and now - self._last_cancel_check >= 1.0:
            self._last_cancel_check = now
            with session_scope(self.url) as s:
                self._stop = state.should_stop(s, self.job_id, self.attempt)
        return self._stop

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def _throttled(self) -> bool:
        now = time.monotonic()
        if now - self._last_progress < self.settings.progress_interval_seconds:
            return True
        self._last_progress = now
        return False

    def on_run_started(self, e: Any) -> None:
        self.total_epochs = e.total_epochs
        if e.split is not None:
            self._update(data_split=e.split)  # the split this run trains on, for the job's page and API
        with session_scope(self.url) as s:
            # Epochs after the checkpoint we resume from will run again: their old rows go.
            s.execute(delete(JobMetric).where(JobMetric.job_id == self.job_id, JobMetric.epoch > e.resumed_from_epoch))
            ok = state.fenced_update(
                s,
                self.job_id,
                self.attempt,
                total_epochs=e.total_epochs,
                epoch=e.resumed_from_epoch,
                progress=e.resumed_from_epoch / e.total_epochs,
                message=f"training on {e.device}",
            )
            if not ok:
                raise Superseded

    def on_stage_started(self, e: Any) -> None:
        self._update(stage=e.stage, message=e.description[:300])

    def on_progress(self, e: Any) -> None:
        if e.done < e.total and self._throttled():
            return
        label = {"data": "checking and caching images", "features": "computing features"}.get(e.stage, e.stage)
        self._update(stage=e.stage, message=f"{label}: {e.done}/{e.total}")

    def on_batch_end(self, e: Any) -> None:
        if self._throttled():
            return
        progress = ((e.epoch - 1) + e.batch / e.num_batches) / max(e.total_epochs, 1)
        self._update(
            progress=min(progress, 0.999),
            eta_seconds=e.eta,
            images_per_sec=e.images_per_sec,
            message=f"epoch {e.epoch}/{e.total_epochs}, batch {e.batch}/{e.num_batches}",
        )

    def on_epoch_end(self, e: Any) -> None:
        with session_scope(self.url) as s:
            ok = state.fenced_update(
                s,
                self.job_id,
                self.attempt,
                epoch=e.epoch,
                progress=min(e.epoch / max(e.total_epochs, 1), 0.999),
                eta_seconds=e.eta,
                images_per_sec=e.images_per_sec,
                message=f"epoch {e.epoch}/{e.total_epochs} done",
            )
            if not ok:
                self._stop = True
                return
            s.execute(delete(JobMetric).where(JobMetric.job_id == self.job_id, JobMetric.epoch == e.epoch))
            s.add(
                JobMetric(
                    job_id=self.job_id,
                    attempt=self.attempt,
                    epoch=e.epoch,
                    stage=e.stage,
                    train_loss=e.train_loss,
                    train_acc=e.train_acc,
                    val_loss=e.val_loss,
                    val_acc=e.val_acc,
                    lr=e.lr,
                    images_per_sec=e.images_per_sec,
                    epoch_time=e.epoch_time,
                    is_best=e.is_best,
                )
            )

    def on_checkpoint_saved(self, e: Any) -> None:
        self.publish()

    def on_oom_retry(self, e: Any) -> None:
        self._update(message=f"CUDA out of memory: now {e.accumulation_steps} micro-batches of {e.new_micro_batch}")

    def _record_choice(self, key: str, value: Any) -> None:
        """One part of what the run decided itself (``jobs.run_choices``); the parts arrive one event each."""
        self.choices[key] = value
        self._update(run_choices=dict(self.choices))

    def on_defaults_chosen(self, e: Any) -> None:
        self._record_choice("defaults", e.choices)

    def on_lr_found(self, e: Any) -> None:
        self._record_choice("lr_finder", {"lr": e.lr, "method": e.method, "lrs": e.lrs, "losses": e.losses})
        self._update(message=f"learning rate {e.lr:.3g} chosen by the range test")

    def on_budget_planned(self, e: Any) -> None:
        plan = {
            "budget_seconds": e.budget_seconds,
            "epochs": e.epochs,
            "train_images_per_sec": e.train_images_per_sec,
            "eval_images_per_sec": e.eval_images_per_sec,
            "estimated_seconds": e.estimated_seconds,
            "reason": e.reason,
        }
        self._record_choice("budget", plan)
        eta = e.eta if e.eta is not None else e.estimated_seconds
        self._update(eta_seconds=eta, message=e.reason[:300])

    def on_budget_reached(self, e: Any) -> None:
        self._update(message=f"time budget reached after epoch {e.epoch}: evaluating")

    def on_early_stopped(self, e: Any) -> None:
        self._update(message=f"early stopping at epoch {e.epoch}; best epoch {e.best_epoch}")


def run(settings: Settings, job_id: str, attempt: int, reporter: JobReporter | None = None) -> int:
    from finetune.distributed import setup

    storage = Storage.from_settings(settings)
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        if job is None or job.attempt != attempt or job.status != JobStatus.RUNNING:
            log.info("job %s attempt %s is no longer ours; exiting", job_id, attempt)
            return 0
        dataset = s.get(Dataset, job.dataset_id) if job.dataset_id else None
        job_config, run_key, owner_id = dict(job.config), job.run_key, job.owner_id
    reporter = reporter or JobReporter(settings, job_id, attempt)
    # Under torchrun (a job on several devices) every rank joins first; rank 0 fetches and records.
    ranks = setup(int(job_config.get("devices", 1)), "auto") if _under_torchrun() else None
    if ranks is not None and not ranks.is_main:
        ranks.wait_for_main()  # rank 0 has fetched the dataset and the run
        return follow(storage, dataset, job_config, run_key, settings, reporter)
    released = ranks is None

    def release_ranks() -> None:
        nonlocal released
        if not released:
            released = True
            assert ranks is not None
            ranks.wait_for_main()

    reporter.publish = lambda: storage.publish(run_key)
    try:
        if dataset is None:
            raise InputError("the job's dataset was deleted")
        storage.fetch(dataset.storage_key, immutable=True)  # with object storage: this host's copy of it
        storage.fetch(run_key)  # a run another host started (or continued) goes on from its last checkpoint
        release_ranks()
        out, here = engine_config(storage, dataset, job_config, run_key, settings)
        result = train_or_resume(storage, job_config, out, here, [reporter], reporter.should_stop)
    except (Cancelled, Superseded):
        _publish_quietly(storage, run_key)
        if reporter.draining:
            log.info("job %s attempt %s stopped for its worker's drain; the worker requeues it", job_id, attempt)
            return EXIT_DRAINED
        with session_scope(settings.db_url) as s:
            state.cancelled(s, job_id, attempt)
        return 0
    except InputError as e:
        _publish_quietly(storage, run_key)
        _fail(settings, job_id, attempt, str(e), getattr(e, "code", "bad_input"))
        return 0
    except Exception as e:
        if ranks is not None and lost_a_rank(e):
            log.exception("job %s lost one of its ranks; its launcher reports how it ended", job_id)
            return EXIT_PEER_LOST
        log.exception("job %s failed", job_id)
        _publish_quietly(storage, run_key)
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        _fail(settings, job_id, attempt, _explain_failure(e, detail), "training_failed")
        return 1
    finally:
        release_ranks()  # ended before the others were let go: they go on and fail fast without rank 0
    assert dataset is not None
    storage.publish(run_key)  # the model's files are in the store before the model row says they exist
    with session_scope(settings.db_url) as s:
        ok = state.succeed(s, job_id, attempt, progress=1.0, message="finished")
        if ok:
            s.add(
                Model(
                    owner_id=owner_id,
                    job_id=job_id,
                    name=_model_name(dataset.name, str(job_config.get("model"))),
                    arch=str(job_config.get("model")),
                    num_classes=len(dataset.classes),
                    classes=list(dataset.classes),
                    evaluation=result.evaluation,
                    config=job_config,
                    run_key=run_key,
                    size_bytes=storage.size(run_key),
                )
            )
    return 0


def lost_a_rank(e: BaseException) -> bool:
    """A collective that failed because another rank is gone (gloo: the connection was reset or closed;
    NCCL: the communicator aborted or timed out), not an error of this rank's own."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("by peer", "Connection closed", "Connection reset", "NCCL communicator", "Timed out")
    )


def _under_torchrun() -> bool:
    from finetune.distributed import launched_ranks

    return launched_ranks() > 1


def engine_config(
    storage: Storage, dataset: Dataset, job_config: dict[str, Any], run_key: str, settings: Settings
) -> tuple[str, dict[str, Any]]:
    """The run folder and the host-local settings of the engine's config, relative to the data folder."""
    split = TrainConfig(**job_config)  # the job's own seed and fractions, defaults included
    here: dict[str, Any] = {
        # The uploaded folder itself (the engine finds the same root in it), so its names file is read.
        "data": str(dataset_images_folder(storage, dataset).relative_to(storage.root)),
        "cache_dir": _under(settings.cache_dir, storage.root),
        "weights_dir": _under(settings.weights_dir, storage.root) if settings.weights_dir else None,
        # The images the upload's check accepted, in the split the dataset's page shows (or, for a job
        # asking for another seed or fractions, those images to split again).
        "split_file": str(
            split_file_for(storage, dataset, split.seed, split.val_fraction, split.test_fraction).relative_to(
                storage.root
            )
        ),
        "cache_max_bytes": settings.cache_max_bytes,
    }
    return str(storage.path(run_key).relative_to(storage.root)), here


def train_or_resume(
    storage: Storage,
    job_config: dict[str, Any],
    out: str,
    here: dict[str, Any],
    callbacks: list[Callable[[Event], None]],
    should_stop: Callable[[], bool],
) -> RunResult:
    from finetune.train import resume, train

    run_dir = storage.root / out
    # Paths relative to the data folder, the working directory meanwhile: see the module's docstring.
    with contextlib.chdir(storage.root):
        if (run_dir / "run.json").exists():
            return resume(out, callbacks, should_stop, overrides=here)
        if os.environ.get("RANK", "0") == "0":
            _clear_unstarted(run_dir)
        return train(TrainConfig(**job_config, **here, out=out), callbacks, should_stop)


def follow(
    storage: Storage,
    dataset: Dataset | None,
    job_config: dict[str, Any],
    run_key: str,
    settings: Settings,
    reporter: JobReporter,
) -> int:
    """A rank other than 0: train along, record nothing. Rank 0 decides the job's outcome; a stop (cancel,
    drain) reaches every rank at the same batch."""
    if dataset is None:
        return 0
    try:
        out, here = engine_config(storage, dataset, job_config, run_key, settings)
        train_or_resume(storage, job_config, out, here, [], lambda: reporter.draining)
    except Cancelled:
        return EXIT_DRAINED if reporter.draining else 0
    except Exception:
        log.exception("rank %s of the job's run failed", os.environ.get("RANK"))
        return 1
    return 0


def _publish_quietly(storage: Storage, run_key: str) -> None:
    """On the way out after a stop or a failure: what was saved goes to the store if it can."""
    try:
        if storage.path(run_key).is_dir():
            storage.publish(run_key)
    except Exception:
        log.exception("could not publish %s", run_key)


def _under(path: Path, root: Path) -> str:
    """``path`` relative to the data folder when it is inside it (one host's cache there); else this host's
    own absolute path, which only this host uses: a resume passes its own again."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _clear_unstarted(run_dir: Path) -> None:
    """An attempt killed before its run started (no run.json yet) can leave files behind (dataset.json, a
    temporary file). Nothing there is worth keeping, and the engine refuses a non-empty folder for a new run:
    without this, such a job could never run again."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        log.info("clearing %s, left by an attempt that stopped before its run started", run_dir)
        shutil.rmtree(run_dir)


def _model_name(dataset_name: str, arch: str) -> str:
    """The model's name, "<dataset> · <arch>", its dataset part cut to fit the column (PostgreSQL enforces it)."""
    suffix = f" · {arch}"
    limit = 200 - len(suffix)  # models.name is String(200)
    return f"{dataset_name[:limit].rstrip()}{suffix}"


def _explain_failure(e: Exception, detail: str) -> str:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: the last good checkpoint is kept; free space and resume the job"
    return detail[:2000]


def _fail(settings: Settings, job_id: str, attempt: int, message: str, code: str) -> None:
    with session_scope(settings.db_url) as s:
        state.fail(s, job_id, attempt, message, code)


def main(argv: list[str]) -> int:
    job_id, attempt, parent_pid = argv[0], int(argv[1]), int(argv[2])
    die_with_parent(parent_pid)  # the job dies with its worker
    # Training takes every core it is given; at a lower priority it still does when they are idle, but the API
    # (same machine, often the same container) keeps answering predictions and health checks while it runs.
    os.nice(10)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_env()
    reporter = JobReporter(settings, job_id, attempt)
    # SIGTERM from the worker (a cancel past its grace period) ends the run like a cancel would; SIGUSR1 (the
    # worker drains) stops it at the next batch boundary for another worker to continue.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGUSR1, lambda *_: reporter.drain())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})  # blocked by the worker until now
    return run(settings, job_id, attempt, reporter)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
