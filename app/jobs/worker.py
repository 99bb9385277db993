"""The worker: takes job ids from the queue and runs each job in its own child process.

The worker process never imports torch and never touches CUDA. It registers itself under a random id (host
and pid only describe it), then runs:

- one consumer thread per job slot: take a message, claim the job, start ``python -m app.jobs.child``
  pinned to one GPU, renew the job's lease every heartbeat, stop the child when the job is cancelled or
  lost, and record how the child ended if the child could not (killed, out of memory, crashed);
- a housekeeping thread, never queued behind training: renews the worker's own lease, takes back jobs
  whose holder's lease lapsed (a dead worker's, on any host) and re-sends queued jobs whose message was lost.

SIGTERM (or SIGINT) drains: no more claims, each child stops at its next batch boundary (its last
checkpoint is kept), its job goes back to the queue at once for another worker, and the process exits
within ``drain_timeout_seconds`` (children still running then are killed, and their jobs requeued too).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select

from app.db import session_scope
from app.db.tables import Job, Worker
from app.jobs import recovery, state
from app.jobs.lifetime import PARENT_PID_ENV, die_with_parent
from app.jobs.queue import JobQueue
from app.jobs.settings_env import settings_to_env
from app.settings import Settings

log = logging.getLogger(__name__)

EXIT_DRAINED = 75  # the child stopped at a batch boundary because its worker drains (EX_TEMPFAIL)
DRAIN_SIGNAL = signal.SIGUSR1  # worker -> child: stop at the next batch boundary, the job will be requeued
WEIGHTS_REFRESH_SECONDS = 60.0
FORGET_WORKERS_AFTER_SECONDS = 24 * 3600.0  # registry rows of workers gone this long are deleted


def gpu_ids() -> list[str]:
    """GPU indices from ``nvidia-smi -L`` (no CUDA initialisation in this process), honouring
    CUDA_VISIBLE_DEVICES when it is set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def advertised_devices(settings: Settings) -> list[str]:
    """What a worker offers one job: its GPU ids, or on a host without GPUs ``cpu:0`` ... ``cpu:N-1``
    (``cpu_devices``: that many gloo processes)."""
    gpus = gpu_ids()
    if gpus:
        return gpus[: settings.worker_slots or len(gpus)]  # the cards its slots use
    return [f"cpu:{i}" for i in range(settings.cpu_devices)]


def slot_count(settings: Settings) -> int:
    return settings.worker_slots or max(1, len(gpu_ids()))


def usable_weights(settings: Settings) -> list[str]:
    """Architectures whose ImageNet weights this host holds and a job may use (what the worker advertises)."""
    from finetune import weights as engine_weights

    usable = []
    for s in engine_weights.status_all(settings.weights_dir, verify=True):  # hashes are remembered per file
        if s.present and (s.verified is not False or s.accepted_unverified):
            usable.append(s.arch)
    return usable


@dataclass
class ChildExit:
    returncode: int
    cancelled: bool = False  # a cancel was asked for (the child stopped, or was stopped after the grace)
    drained: bool = False  # the worker drained: the child was asked to stop (or killed at the deadline)
    lost: bool = False  # the job's lease was lost: killed so that no two attempts write one run folder


class JobWorker:
    """One worker process: its identity, its slots, its children, its threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.id = uuid.uuid4().hex  # per process start: two containers that are both PID 1 differ here
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.devices = gpu_ids()
        self.slots = settings.worker_slots or max(1, len(self.devices))
        # The most devices one job may use here: distinct cards among the slots, or gloo processes on a CPU.
        self.capacity = min(len(self.devices), self.slots) if self.devices else settings.cpu_devices
        # What the registry shows and job requests are checked against: the cards its slots use, or cpu:N.
        self.advertised = advertised_devices(settings) if not self.devices else self.devices[: self.capacity]
        self.weights = usable_weights(settings)
        self.queue = JobQueue(settings, runner=self.run_job)
        self.draining = threading.Event()
        self.drain_deadline = float("inf")
        self._done = threading.Event()  # housekeeping stops
        self._gpu = queue.Queue[str | None]()
        for i in range(self.slots):
            self._gpu.put(self.devices[i % len(self.devices)] if self.devices else None)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._reserving = threading.Lock()  # one job at a time takes several slots

    # -- life ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        with session_scope(self.settings.db_url) as s:
            state.register_worker(
                s,
                self.settings.lease_seconds,
                id=self.id,
                host=self.host,
                pid=self.pid,
                slots=self.slots,
                devices=self.advertised,
                weights=self.weights,
                draining=False,
            )
        log.info(
            "worker %s on %s (pid %d): %d job slot(s), devices %s, ImageNet weights for %s, queue %s",
            self.id, self.host, self.pid, self.slots, self.devices or "cpu", self.weights or "none",
            self.settings.queue_backend,
        )  # fmt: skip
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self.drain(signal.Signals(signum).name))
        housekeeper = threading.Thread(target=self._housekeep, name="housekeeping", daemon=True)
        housekeeper.start()
        consumers = [threading.Thread(target=self._consume, name=f"slot-{i}", daemon=True) for i in range(self.slots)]
        for t in consumers:
            t.start()
        while any(t.is_alive() for t in consumers):  # short joins: the main thread must stay free for signals
            for t in consumers:
                t.join(0.2)
        self._done.set()
        housekeeper.join(10)
        with session_scope(self.settings.db_url) as s:
            state.stop_worker(s, self.id)
        self.queue.close()
        log.info("worker %s stopped", self.id)

    def drain(self, why: str) -> None:
        if self.draining.is_set():
            return
        self.drain_deadline = time.monotonic() + self.settings.drain_timeout_seconds
        self.draining.set()
        log.warning(
            "%s: draining (no new jobs; running ones stop at their next batch and go back to the queue; "
            "at most %.0fs)", why, self.settings.drain_timeout_seconds,
        )  # fmt: skip
        with self._lock:
            children = list(self._children.values())
        for proc in children:
            _signal(proc, DRAIN_SIGNAL)

    # -- taking jobs --------------------------------------------------------------------------------------
    def _consume(self) -> None:
        delay = 0.1
        while not self.draining.is_set():
            try:
                task = self.queue.huey.dequeue()
            except Exception:
                log.exception("could not read the queue; trying again")
                self.draining.wait(1.0)
                continue
            if task is None:
                self.draining.wait(delay)
                delay = min(delay * 1.5, 1.0)
                continue
            delay = 0.1
            try:
                self.queue.huey.execute(task)
            except Exception:
                log.exception("task %s failed", task)

    def run_job(self, job_id: str) -> None:
        """The ``run_job`` task: claim, run the child, record the outcome."""
        if self.draining.is_set():  # taken just as the drain began: hand it back
            self.queue.enqueue(job_id)
            return
        devices = self._can_run(job_id)
        if devices is None:
            return
        with session_scope(self.settings.db_url) as s:
            attempt = state.claim(s, job_id, self.id, self.settings.lease_seconds)
        if attempt is None:
            log.info("job %s is not queued any more (cancelled, or already taken); skipping", job_id)
            return
        slots = self._reserve(devices)
        try:
            ended = self._run_child(job_id, attempt, slots, devices)
            self._record_exit(job_id, attempt, ended)
        finally:
            for slot in slots:
                self._gpu.put(slot)

    def _reserve(self, devices: int) -> list[str | None]:
        """The job's slots: one, or on a GPU host as many as it takes to hold ``devices`` distinct cards (the
        whole of each card: its other slots too when a card has several). One job reserves at a time, so two
        jobs never each hold half of what both need."""
        if devices <= 1 or not self.devices:
            return [self._gpu.get()]
        with self._reserving:
            slots: list[str | None] = []
            while len(set(slots)) < devices:
                slots.append(self._gpu.get())
            return slots

    def _can_run(self, job_id: str) -> int | None:
        """The devices the job asks for, or None when it is left queued, saying why: a job needing ImageNet
        weights this host lacks, or more devices than it has. The sweep for queued jobs without a message
        sends it again, and a worker that can run it takes it."""
        with session_scope(self.settings.db_url) as s:
            job = s.execute(select(Job.weights, Job.arch, Job.config).where(Job.id == job_id)).first()
            if job is None:
                return 1
            devices = int((job.config or {}).get("devices", 1))
            capacity = self.capacity
            if devices > capacity:
                why = f"waiting for a worker with {devices} devices ({self.host} has {capacity})"
            elif job.weights != "imagenet" or job.arch in self.weights:
                return devices
            else:
                why = f"waiting for a worker that holds the ImageNet weights of {job.arch} ({self.host} has none)"
            state.set_waiting_message(s, job_id, why)
        log.info("job %s: %s; leaving it queued", job_id, why)
        return None

    # -- one child ----------------------------------------------------------------------------------------
    def _run_child(self, job_id: str, attempt: int, slots: list[str | None], devices: int = 1) -> ChildExit:
        env = {**os.environ, **settings_to_env(self.settings)}
        cards = sorted({s for s in slots if s is not None}, key=slots.index)
        if cards:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(cards)
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "app.jobs.child", job_id, str(attempt), str(os.getpid())]
        if devices > 1:  # one process per device under torchrun (app.jobs.ranks), rank 0 the reporting one
            cmd = [sys.executable, "-m", "app.jobs.ranks", job_id, str(attempt), str(os.getpid()), str(devices)]
            if not cards:
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
        with open(logs / f"job-{job_id}-{attempt}.log", "ab") as logfile:
            proc = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
            log.info("job %s attempt %s: started process %s", job_id, attempt, proc.pid)
            with self._lock:
                self._children[job_id] = proc
            try:
                if self.draining.is_set():  # the drain began while it started: it has its signal too
                    _signal(proc, DRAIN_SIGNAL)
                return self._supervise(job_id, attempt, proc)
            finally:
                with self._lock:
                    self._children.pop(job_id, None)

    def _supervise(self, job_id: str, attempt: int, proc: subprocess.Popen[bytes]) -> ChildExit:
        """Wait for the child; renew the job's lease; stop the child when cancelled, lost or drained too long."""
        s = self.settings
        ended = ChildExit(0)
        next_beat = 0.0
        renewed = time.monotonic()  # when the last successful renewal was sent
        stop_since: float | None = None
        while True:
            try:
                ended.returncode = proc.wait(timeout=0.25)
                return ended
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self.draining.is_set():
                ended.drained = True
                if now > self.drain_deadline:
                    log.warning("job %s did not stop before the drain deadline; killing it", job_id)
                    proc.kill()
            if now >= next_beat:
                next_beat = now + s.heartbeat_seconds
                lease = self._renew(job_id, attempt)
                if lease is not None:
                    renewed = now
                    if not lease.held:
                        log.warning("job %s attempt %d was taken back (its lease lapsed); killing it", job_id, attempt)
                        ended.lost = True
                        proc.kill()
                    elif lease.cancel_requested and stop_since is None:
                        stop_since, ended.cancelled = now, True
            if now - renewed > s.lease_seconds and not ended.lost:
                # The lease may have lapsed in the database: another worker may take the job. Stop writing.
                log.error("could not renew the lease of job %s for %.0fs; killing it", job_id, now - renewed)
                ended.lost = True
                proc.kill()
            if stop_since is not None and now - stop_since > s.cancel_grace_seconds:
                log.warning("job %s did not stop within %ss; terminating it", job_id, s.cancel_grace_seconds)
                _signal(proc, signal.SIGTERM)
                try:
                    ended.returncode = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    ended.returncode = proc.wait()
                return ended

    def _renew(self, job_id: str, attempt: int) -> state.Lease | None:
        try:
            with session_scope(self.settings.db_url) as s:
                return state.renew(s, job_id, attempt, self.settings.lease_seconds)
        except Exception:  # a database hiccup must not kill the supervisor; try again next beat
            log.exception("renewing the lease of job %s failed", job_id)
            return None

    def _record_exit(self, job_id: str, attempt: int, ended: ChildExit) -> None:
        """Record how the child ended when the child could not. Every transition is conditional on this
        attempt still holding the job: when the child recorded its outcome, nothing here changes anything."""
        if ended.lost:
            return
        rc = ended.returncode
        # A child still starting when the drain began dies of the drain signal itself (no handler yet): drained.
        drained = ended.drained or self.draining.is_set()
        requeued = False
        with session_scope(self.settings.db_url) as s:
            if drained and not ended.cancelled and (rc == EXIT_DRAINED or rc < 0):
                why = f"its worker on {self.host} was shut down; it continues from its last checkpoint"
                requeued = state.requeue(s, job_id, attempt, why, retry=False) is state.Requeued.REQUEUED
            elif ended.cancelled:
                state.cancelled(s, job_id, attempt)
            elif rc < 0:
                sig = signal.Signals(-rc).name
                how = "killed by the system (out of memory?)" if sig == "SIGKILL" else f"killed by {sig}"
                why = f"the training process was {how} on {self.host}; retrying from the last checkpoint"
                outcome = state.requeue(s, job_id, attempt, why, retry=True, max_retries=self.settings.max_job_retries)
                requeued = outcome is state.Requeued.REQUEUED
            elif rc != 0:
                message = f"the training process exited with code {rc} without a result (see its log)"
                state.fail(s, job_id, attempt, message, "process_died")
        if requeued:
            log.warning("job %s went back to the queue (attempt %d ended with %s)", job_id, attempt, rc)
            self._enqueue(job_id)

    def _enqueue(self, job_id: str) -> None:
        try:
            self.queue.enqueue(job_id)
        except Exception:  # the sweep for queued jobs without a message sends it later
            log.exception("could not enqueue job %s", job_id)

    # -- housekeeping -------------------------------------------------------------------------------------
    def _housekeep(self) -> None:
        s = self.settings
        next_weights = time.monotonic() + WEIGHTS_REFRESH_SECONDS
        next_sweep = 0.0  # lost messages: every half grace period (it reads the queue's pending messages)
        while not self._done.is_set():
            try:
                if time.monotonic() >= next_weights:
                    next_weights = time.monotonic() + WEIGHTS_REFRESH_SECONDS
                    self.weights = usable_weights(s)
                    self._forget_old_workers()
                with session_scope(s.db_url) as session:
                    state.renew_worker(
                        session, self.id, s.lease_seconds, draining=self.draining.is_set(), weights=self.weights
                    )
                recovery.recover_lost_jobs(s, self.queue)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + s.lost_message_seconds / 2
                    recovery.resend_lost_messages(s, self.queue)
            except Exception:
                log.exception("housekeeping failed; trying again")
            self._done.wait(s.recovery_interval_seconds)

    def _forget_old_workers(self) -> None:
        with session_scope(self.settings.db_url) as s:
            s.execute(delete(Worker).where(Worker.heartbeat_at < state.db_now(-FORGET_WORKERS_AFTER_SECONDS)))


def _signal(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def run_worker(settings: Settings) -> None:
    """The `worker` command: apply migrations, register, consume the queue until drained."""
    from app.db.migrate import upgrade

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:  # started by `serve`: drain when serve goes, even if it is killed with -9
        die_with_parent(int(parent), signal.SIGTERM)
    upgrade(settings.db_url)
    JobWorker(settings).run()
