"""Tying a process's life to its parent's (Linux): no orphaned workers or job processes."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "FINETUNE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when the thread that started it exits; exit at
    once if the parent is already gone (it died before the request took effect)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent_pid:
        os._exit(1)
