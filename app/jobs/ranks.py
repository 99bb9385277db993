"""A job on several devices: ``python -m app.jobs.ranks JOB_ID ATTEMPT PARENT_PID DEVICES``.

The worker starts this instead of ``app.jobs.child`` when a job asks for ``devices`` > 1. It is torchrun's
agent (``torch.distributed.run``, called in this process; it imports torch but never initialises CUDA):
standalone rendezvous on this host, one ``app.jobs.child`` process per device, on the cards the worker
reserved in ``CUDA_VISIBLE_DEVICES`` (or gloo processes on a CPU host). Rank 0 reports to the database;
the other ranks only train.

It ties the ranks to the worker's life: it dies with the worker (and the ranks die with it), it passes
the worker's drain signal on to every rank, and it ends the way the job's processes ended, so the worker
records the outcome as for one process: a rank killed by a signal (the OOM killer's SIGKILL) ends this
process by the same signal (the job is retried from its last checkpoint), a drained job exits 75, any other
failure exits with its rank's code. torchrun stops every rank as soon as one fails, and the collectives
time out (``FINETUNE_DIST_TIMEOUT``) if a rank hangs without dying: no rank is left waiting.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.jobs.lifetime import die_with_parent

log = logging.getLogger("app.jobs.ranks")

DRAIN_SIGNAL = signal.SIGUSR1  # same as app.jobs.worker.DRAIN_SIGNAL
EXIT_PEER_LOST = 76  # same as app.jobs.child.EXIT_PEER_LOST


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _forward_drain(signum: int, _frame: object) -> None:
    for pid in child_pids(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def torchrun_args(job_id: str, attempt: int, devices: int) -> list[str]:
    return [
        "--standalone",
        f"--nproc-per-node={devices}",
        "-m",
        "app.jobs.child",
        job_id,
        str(attempt),
        str(os.getpid()),  # the ranks die with this process
    ]


def main(argv: list[str]) -> int:
    job_id, attempt, parent_pid, devices = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(DRAIN_SIGNAL, _forward_drain)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args(job_id, attempt, devices)))
    except ChildFailedError as e:
        code = cause(e.failures)
        log.error(
            "job %s attempt %s: ranks ended with %s", job_id, attempt, {r: f.exitcode for r, f in e.failures.items()}
        )
        if code < 0:  # killed by a signal: end the same way, as one job process would
            if -code != signal.SIGKILL:  # its handler cannot be changed (nor caught)
                signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        return code or 1
    return 0


def cause(failures: Mapping[int, Any]) -> int:
    """The exit code that says why the ranks ended: a rank killed by a signal first (the OOM killer; the
    others failed because it was gone), then a rank's own error, then what torchrun did to the others as it
    stopped them (SIGTERM) and rank 0's "lost a rank"."""
    codes = [f.exitcode for _, f in sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))]
    stopping = (-signal.SIGTERM, 128 + signal.SIGTERM, EXIT_PEER_LOST)
    for wanted in (lambda c: c < 0 and c not in stopping, lambda c: c not in stopping):
        found = [c for c in codes if wanted(c)]
        if found:
            return found[0]
    return codes[0] if codes else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
