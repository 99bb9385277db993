"""A real, small filesystem for disk-full tests: a tmpfs mounted for the test, filled on demand.

Mounting needs root (CI runs the tests as root in a container); elsewhere the tests that need it are skipped
and the engine's injected-failure tests still cover the code path.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FILLER = ".filler"


@contextmanager
def small_filesystem(path: Path, size: str = "16m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``path`` (created if needed) for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: detached now even if a process that outlived the test still has a file open on it.
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int = 0) -> None:
    """Take the free space of the filesystem at ``path``, all but ``leave`` bytes, with one filler file (grown
    on each call, so calling it again takes back what was freed since)."""
    with open(path / FILLER, "ab") as f:
        for _ in range(10):
            extra = free_bytes(path) - leave
            if extra <= 0:
                return
            try:
                os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, extra)
                return
            except OSError as e:  # someone else wrote meanwhile: measure again
                if e.errno != errno.ENOSPC:
                    raise


def free_space(path: Path) -> None:
    """Give the filler's space back."""
    (path / FILLER).unlink(missing_ok=True)
