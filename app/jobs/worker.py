"""The worker: takes job ids from the queue and runs each job in its own child process.

The worker process never imports torch and never touches CUDA: it claims a job, starts
``python -m app.jobs.child`` pinned to one GPU slot, keeps the job's heartbeat, enforces cancel after a
grace period, and records how the child ended if the child could not (killed, out of memory, crashed).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

from app.db import session_scope
from app.db.tables import Job, utcnow
from app.jobs import state
from app.jobs.lifetime import PARENT_PID_ENV, die_with_parent
from app.jobs.settings_env import settings_to_env
from app.settings import Settings

log = logging.getLogger(__name__)

_slots: queue.Queue[str | None] | None = None
_slots_lock = threading.Lock()


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


def slot_count(settings: Settings) -> int:
    return settings.worker_slots or max(1, len(gpu_ids()))


def _take_slot(settings: Settings) -> str | None:
    """One job per GPU: each running job holds one GPU id (None on a CPU machine)."""
    global _slots
    with _slots_lock:
        if _slots is None:
            _slots = queue.Queue()
            gpus = gpu_ids()
            for i in range(slot_count(settings)):
                _slots.put(gpus[i % len(gpus)] if gpus else None)
    return _slots.get()


def _release_slot(slot: str | None) -> None:
    assert _slots is not None
    _slots.put(slot)


def execute_job(settings: Settings, job_id: str) -> None:
    """The huey task body: claim, run the child, record the outcome."""
    with session_scope(settings.db_url) as s:
        attempt = state.claim(s, job_id, state.worker_identity())
    if attempt is None:
        log.info("job %s is not queued any more (cancelled, or already taken); skipping", job_id)
        return
    slot = _take_slot(settings)
    try:
        returncode, cancelled = _run_child(settings, job_id, attempt, slot)
        _record_exit(settings, job_id, attempt, returncode, cancelled)
    finally:
        _release_slot(slot)


def _run_child(settings: Settings, job_id: str, attempt: int, slot: str | None) -> tuple[int, bool]:
    env = {**os.environ, **settings_to_env(settings)}
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "app.jobs.child", job_id, str(attempt), str(os.getpid())]
    with open(logs / f"job-{job_id}-{attempt}.log", "ab") as logfile:
        proc = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("job %s attempt %s: started process %s", job_id, attempt, proc.pid)
        return _supervise(settings, job_id, attempt, proc)


def _supervise(settings: Settings, job_id: str, attempt: int, proc: subprocess.Popen[bytes]) -> tuple[int, bool]:
    """Wait for the child; keep the heartbeat; stop it when cancelled or superseded."""
    last_beat = 0.0
    stop_since: float | None = None
    cancelled = False
    while True:
        try:
            return proc.wait(timeout=0.5), cancelled
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - last_beat >= settings.heartbeat_seconds:
            last_beat = now
            try:
                with session_scope(settings.db_url) as s:
                    held = state.fenced_update(s, job_id, attempt, heartbeat_at=utcnow())
                    stop = (not held) or state.cancel_requested(s, job_id, attempt)
            except Exception:  # a database hiccup must not kill the supervisor; try again next beat
                log.exception("heartbeat for job %s failed", job_id)
                continue
            if stop and stop_since is None:
                stop_since = now
                cancelled = held
        if stop_since is not None and now - stop_since > settings.cancel_grace_seconds:
            log.warning("job %s did not stop within %ss; terminating it", job_id, settings.cancel_grace_seconds)
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=10), cancelled
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(), cancelled


def _record_exit(settings: Settings, job_id: str, attempt: int, returncode: int, cancelled: bool) -> None:
    """If the child ended without recording an outcome (killed, crashed), record it now."""
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        if job is None or job.attempt != attempt or job.status != "running":
            return  # the child recorded its outcome (or the job moved on)
        if cancelled or job.cancel_requested:
            state.finish(s, job_id, attempt, "cancelled", message="cancelled")
            return
        if returncode < 0:
            sig = signal.Signals(-returncode).name
            why = "killed by the system (out of memory?)" if sig == "SIGKILL" else f"killed by {sig}"
            message = f"the training process was {why}; resume the job to continue from its last checkpoint"
        else:
            message = f"the training process exited with code {returncode} without a result (see its log)"
        state.finish(s, job_id, attempt, "failed", error=message, error_code="process_died", message="failed")


def run_worker(settings: Settings) -> None:
    """The `worker` command: apply migrations, recover what a previous run left, consume the queue."""
    from app.db.migrate import upgrade
    from app.jobs.queue import JobQueue
    from app.jobs.recovery import recover_jobs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:  # started by `serve`: stop (gracefully) when serve goes, even if it is killed with -9
        die_with_parent(int(parent), signal.SIGTERM)
    upgrade(settings.db_url)
    jobs = JobQueue(settings)
    recover_jobs(settings, jobs, startup=True)
    slots = slot_count(settings)
    log.info("worker %s: %d job slot(s), queue %s", state.worker_identity(), slots, settings.queue_backend)
    jobs.consumer(workers=slots).run()
